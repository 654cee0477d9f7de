//! `credgate keys status`: every user's key, as a table or as JSON. A key
//! id is shown by its last four characters only; a secret never.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::{Custody, Report};
use crate::{aws::keys::key_id::suffix, config::KeySource};

/// Every user's report, in user order; the error when the users could not
/// be listed.
pub(crate) async fn reports(custody: &Custody) -> Result<Vec<Report>, String> {
    let users = custody.users().await?;
    let mut reports = Vec::with_capacity(users.len());
    for signer in &users {
        reports.push(custody.inspect(signer, true).await);
    }
    Ok(reports)
}

/// The reports as one JSON object.
pub(crate) fn json(custody: &Custody, reports: &[Report]) -> Value {
    let settings = custody.settings();
    let secrets = settings.source == KeySource::SecretsManager;
    json!({
        "source": settings.source.as_str(),
        "secret_name": secrets.then(|| settings.secret_name.template()),
        "rotate_after_seconds": if secrets { settings.rotate_after.map(|d| d.as_secs()) } else { None },
        "warn_key_age_seconds": settings.warn_key_age.as_secs(),
        "users": reports.iter().map(|r| user_json(custody, r)).collect::<Vec<_>>(),
    })
}

fn user_json(custody: &Custody, r: &Report) -> Value {
    let age = r.created.map(age_of);
    json!({
        "iam_user": r.signer.iam_user(),
        "profile": r.signer.profile(),
        "key_id_suffix": r.key_id.as_deref().map(suffix),
        "created": r.created.map(rfc3339),
        "age_seconds": age.map(|a| a.as_secs()),
        "over_age": age.map(|a| a > custody.settings().warn_key_age),
        "last_used": r.last_used.as_ref().and_then(|u| u.at).map(rfc3339),
        "last_used_service": r.last_used.as_ref().and_then(|u| u.service.clone()),
        "rotation": r.state.as_str(),
        "next_rotation": custody.next_rotation(r).map(rfc3339),
        "error": r.error,
    })
}

/// The reports as a table.
pub(crate) fn text(custody: &Custody, reports: &[Report]) -> String {
    let settings = custody.settings();
    let mut out = match settings.source {
        KeySource::Profiles => format!(
            "source: profiles (rotated by hand); a key older than {} is reported\n",
            setting(settings.warn_key_age)
        ),
        KeySource::SecretsManager => format!(
            "source: secretsmanager ({}); {}; a key older than {} is reported\n",
            settings.secret_name.template(),
            match settings.rotate_after {
                Some(after) => format!("rotated after {}", setting(after)),
                None => "never rotated (rotate_after = \"0s\")".to_owned(),
            },
            setting(settings.warn_key_age)
        ),
    };
    let mut rows = vec![[
        "IAM USER".to_owned(),
        "KEY".to_owned(),
        "AGE".to_owned(),
        "LAST USED".to_owned(),
        "ROTATION".to_owned(),
        "NEXT ROTATION".to_owned(),
    ]];
    for r in reports {
        let age = r.created.map(age_of);
        let over = age.is_some_and(|a| a > settings.warn_key_age);
        rows.push([
            r.signer.iam_user().to_owned(),
            r.key_id
                .as_deref()
                .map_or_else(|| "-".to_owned(), |k| format!("…{}", suffix(k))),
            age.map_or_else(
                || "-".to_owned(),
                |a| format!("{}{}", days(a), if over { " (over age)" } else { "" }),
            ),
            match r.last_used.as_ref() {
                Some(used) => used.at.map_or_else(|| "never".to_owned(), rfc3339),
                None => "-".to_owned(),
            },
            r.state.as_str().to_owned(),
            custody
                .next_rotation(r)
                .map_or_else(|| "-".to_owned(), rfc3339),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| {
            rows.iter()
                .map(|row| row[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for r in reports.iter().filter(|r| r.error.is_some()) {
        out.push_str(&format!(
            "{}: {}\n",
            r.signer.iam_user(),
            r.error.as_deref().unwrap_or_default()
        ));
    }
    out
}

fn age_of(created: SystemTime) -> Duration {
    SystemTime::now()
        .duration_since(created)
        .unwrap_or_default()
}

/// An age in days and hours (`3d 4h`), or minutes and seconds when young.
fn days(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// A configured duration as it was likely written: whole days as `90d`
/// (humantime would say `2months 29days 2h 52m 48s`).
fn setting(d: Duration) -> String {
    match d.as_secs() {
        s if s >= 86400 && s % 86400 == 0 && d.subsec_nanos() == 0 => format!("{}d", s / 86400),
        _ => humantime::format_duration(d).to_string(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_in_the_largest_units_that_matter() {
        assert_eq!(days(Duration::from_secs(75)), "1m 15s");
        assert_eq!(days(Duration::from_secs(2 * 3600 + 120)), "2h 2m");
        assert_eq!(days(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d 4h");
        assert_eq!(setting(Duration::from_secs(90 * 86400)), "90d");
        assert_eq!(setting(Duration::from_secs(600)), "10m");
    }
}
