//! The README documents every metric and every setting the code has.

use huginn::settings::Settings;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

#[test]
fn every_metric_is_in_the_readme() {
    let text = readme();
    for (name, _) in huginn::metrics::CATALOG {
        assert!(text.contains(&format!("`{name}`")), "README lacks metric {name}");
    }
}

#[test]
fn every_setting_is_in_the_readme() {
    let text = readme();
    let tree = toml::Value::try_from(Settings::default()).unwrap();
    for (section, table) in tree.as_table().unwrap() {
        let keys: Vec<&String> = table.as_table().unwrap().keys().collect();
        for key in keys {
            assert!(text.contains(&format!("`{section}.{key}`")), "README lacks setting {section}.{key}");
        }
    }
}
