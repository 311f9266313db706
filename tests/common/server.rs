//! Starting a server on 127.0.0.1:0 with the fixture model.

use huginn::server::{AppState, build_state, router};
use huginn::settings::Settings;

pub struct TestServer {
    pub base: String,
    pub state: AppState,
}

pub async fn start_with(settings: Settings) -> TestServer {
    let dir = super::fixture_dir();
    let state = tokio::task::spawn_blocking(move || build_state(settings, &dir).unwrap()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    TestServer { base, state }
}

pub async fn start() -> TestServer {
    start_with(Settings::default()).await
}

pub fn openai(server: &TestServer) -> async_openai::Client<async_openai::config::OpenAIConfig> {
    let config =
        async_openai::config::OpenAIConfig::new().with_api_base(format!("{}/v1", server.base)).with_api_key("unused");
    async_openai::Client::with_config(config)
}
