//! The reader every section's parser uses: typed values out of the TOML
//! tree, each bad one recorded as a problem naming its key, so that parsing
//! goes on and one run reports them all.

use std::{net::SocketAddr, time::Duration};

use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// Accumulates problems while the parser keeps going.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<String>);

impl Problems {
    pub(super) fn push(&mut self, problem: String) {
        self.0.push(problem);
    }

    pub(super) fn unknown_keys(&mut self, table: &Table, prefix: &str, known: &[&str]) {
        for key in table.keys().filter(|k| !known.contains(&k.as_str())) {
            self.push(format!("{prefix}{key}: unknown key"));
        }
    }

    /// The sub-table `name` of `root`, checked for unknown keys.
    pub(super) fn section<'a>(
        &mut self,
        root: &'a Table,
        name: &str,
        known: &[&str],
    ) -> Option<&'a Table> {
        match root.get(name) {
            None => None,
            Some(Value::Table(t)) => {
                self.unknown_keys(t, &format!("{name}."), known);
                Some(t)
            }
            Some(other) => {
                self.push(format!(
                    "{name}: expected a table, found {}",
                    other.type_str()
                ));
                None
            }
        }
    }

    /// Deserializes `table[key]`, recording a problem on failure.
    pub(super) fn value<T: DeserializeOwned>(
        &mut self,
        table: &Table,
        path: &str,
        key: &str,
    ) -> Option<T> {
        let value = table.get(key)?;
        match value.clone().try_into::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(format!("{path}.{key}: {}", e.message().trim()));
                None
            }
        }
    }

    pub(super) fn addr(&mut self, table: &Table, path: &str, key: &str) -> Option<SocketAddr> {
        let text: String = self.value(table, path, key)?;
        text.parse()
            .map_err(|_| {
                self.push(format!(
                    "{path}.{key}: {text:?} is not an IP:port address (e.g. \"0.0.0.0:8443\")"
                ))
            })
            .ok()
    }

    pub(super) fn duration(&mut self, table: &Table, path: &str, key: &str) -> Option<Duration> {
        let text: String = self.value(table, path, key)?;
        match humantime::parse_duration(&text) {
            Ok(d) if d.is_zero() => {
                self.push(format!("{path}.{key}: must be greater than zero"));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.push(format!(
                    "{path}.{key}: {text:?} is not a duration like \"10s\" or \"15m\": {e}"
                ));
                None
            }
        }
    }

    pub(super) fn positive<T>(&mut self, table: &Table, path: &str, key: &str) -> Option<T>
    where
        T: DeserializeOwned + Default + PartialOrd,
    {
        let v: T = self.value(table, path, key)?;
        if v <= T::default() {
            self.push(format!("{path}.{key}: must be greater than zero"));
            return None;
        }
        Some(v)
    }

    pub(super) fn http_url(&mut self, table: &Table, path: &str, key: &str) -> Option<String> {
        let url: String = self.value(table, path, key)?;
        if url.starts_with("http://") || url.starts_with("https://") {
            Some(url)
        } else {
            self.push(format!(
                "{path}.{key}: {url:?} must start with http:// or https://"
            ));
            None
        }
    }

    pub(super) fn required_string(
        &mut self,
        table: &Table,
        path: &str,
        key: &str,
    ) -> Option<String> {
        if !table.contains_key(key) {
            self.push(format!("{path}.{key}: missing"));
            return None;
        }
        let v: String = self.value(table, path, key)?;
        if v.trim().is_empty() {
            self.push(format!("{path}.{key}: must not be empty"));
            return None;
        }
        Some(v)
    }
}

/// `value` into `slot` when there is one (the key was set, and valid);
/// otherwise `slot` keeps its default.
pub(super) fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}
