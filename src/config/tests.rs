//! The parser as a whole: defaults, every problem at once, each section's
//! rules, and the configuration reference (`docs/configuration.md`) listing
//! exactly the keys the parser knows.

use std::time::Duration;

use super::*;

const MINIMAL: &str = r#"
    [tls]
    cert = "c.pem"
    key = "k.pem"
    client_ca = "ca.pem"
    [[callers]]
    spiffe_id = "spiffe://corp.example/ns/a/sa/a"
    iam_user = "a"
    aws_profile = "a"
"#;

#[test]
fn a_minimal_config_gets_the_documented_defaults() {
    let config = Config::parse(MINIMAL).expect("valid");
    assert_eq!(config.server, ServerSettings::default());
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:8443");
    assert_eq!(config.server.admin_listen.to_string(), "0.0.0.0:8081");
    assert_eq!(config.server.request_timeout, Duration::from_secs(10));
    assert_eq!(config.server.shutdown_grace, Duration::from_secs(20));
    assert_eq!(config.aws.region, "us-east-1");
    assert_eq!(config.limits.failed_attempts, 5);
    assert_eq!(config.telemetry.log_format, LogFormat::Json);
    assert_eq!(
        config.callers[0].matcher,
        Matcher::SpiffeId("spiffe://corp.example/ns/a/sa/a".into())
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
        colour = "blue"
        [server]
        listen = "nowhere"
        request_timeout = "soon"
        max_concurrent_requests = 0
        [telemetry]
        log_format = "xml"
        [[callers]]
        spiffe_id = "spiffe://a/b"
        dns_name = "b.example"
        iam_user = "x"
        aws_profile = "x"
        [[callers]]
        common_name = "c"
        iam_user = "c"
        aws_profile = "c"
        [[callers]]
        common_name = "c"
        iam_user = "d"
        aws_profile = "d"
        extra = 1
    "#;
    let err = Config::parse(text).expect_err("invalid");
    let all = err.problems.join("\n");
    for needle in [
        "colour: unknown key",
        "server.listen",
        "server.request_timeout",
        "server.max_concurrent_requests: must be greater than zero",
        "telemetry.log_format",
        "tls: missing section",
        "callers[0]: needs exactly one of",
        "callers[2]: duplicate identity",
        "callers[2].extra: unknown key",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(err.problems.len(), 9, "{all}");
}

#[test]
fn one_identity_can_never_hold_every_connection() {
    let with = |server: &str| Config::parse(&format!("[server]\n{server}\n{MINIMAL}"));
    let config = with("max_connections = 100\nmax_connections_per_caller = 99").expect("valid");
    assert_eq!(config.server.max_connections_per_caller, 99);
    assert_eq!(
        Config::parse(MINIMAL)
            .expect("valid")
            .server
            .max_connections_per_caller,
        64
    );
    let err = with("max_connections = 64").expect_err("the default 64 is not below 64");
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(
        err.problems[0].starts_with("server.max_connections_per_caller: must be below")
            && err.problems[0].contains("the default"),
        "{err}"
    );
    let err = with("max_connections = 8\nmax_connections_per_caller = 0").expect_err("zero");
    assert_eq!(
        err.problems.len(),
        1,
        "one problem, not a second about the default: {err}"
    );
}

#[test]
fn a_caller_without_any_matcher_is_an_error() {
    let text = MINIMAL.replace("spiffe_id = \"spiffe://corp.example/ns/a/sa/a\"", "");
    let err = Config::parse(&text).expect_err("invalid");
    assert!(err.problems[0].contains("found 0"), "{err}");
}

#[test]
fn a_shutdown_grace_shorter_than_the_request_timeout_is_an_error() {
    let with = |server: &str| format!("[server]\n{server}\n{MINIMAL}");
    let err = Config::parse(&with("request_timeout = \"30s\"\nshutdown_grace = \"20s\""))
        .expect_err("grace too short");
    assert!(
        err.problems[0]
            .starts_with("server.shutdown_grace: 20s is shorter than server.request_timeout (30s)"),
        "{err}"
    );
    Config::parse(&with("request_timeout = \"20s\"\nshutdown_grace = \"20s\""))
        .expect("equal is enough");
}

fn with_callers(callers: &str) -> String {
    format!("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\n{callers}")
}

#[test]
fn every_bad_spiffe_id_is_reported_at_once_with_its_rule() {
    let bad = [
        ("spiffe://corp.example/ns/a?x=1", "query"),
        ("spiffe://corp.example/ns/a#f", "fragment"),
        ("spiffe://corp.example:8443/ns/a", "port"),
        ("spiffe://me@corp.example/ns/a", "userinfo"),
        ("spiffe:///ns/a", "empty trust domain"),
        ("spiffe://corp.example/ns/../a", "'..'"),
        ("spiffe://corp.example/ns/a b", "whitespace"),
    ];
    let callers: String = bad
        .iter()
        .enumerate()
        .map(|(i, (id, _))| {
            format!(
                "[[callers]]\nspiffe_id = {id:?}\niam_user = \"u{i}\"\naws_profile = \"p{i}\"\n"
            )
        })
        .collect();
    let err = Config::parse(&with_callers(&callers)).expect_err("invalid");
    assert_eq!(err.problems.len(), bad.len(), "{err}");
    for (i, (_, rule)) in bad.iter().enumerate() {
        assert!(
            err.problems[i].starts_with(&format!("callers[{i}].spiffe_id"))
                && err.problems[i].contains(rule),
            "{}",
            err.problems[i]
        );
    }
}

#[test]
fn one_profile_cannot_stand_for_two_iam_users() {
    let text = with_callers(
        r#"
        [[callers]]
        spiffe_id = "spiffe://corp/ns/a/sa/a"
        iam_user = "alice"
        aws_profile = "shared"
        [[callers]]
        spiffe_id = "spiffe://corp/ns/b/sa/b"
        iam_user = "bob"
        aws_profile = "shared"
        [[callers]]
        dns_name = "alice.corp"
        iam_user = "alice"
        aws_profile = "shared"
    "#,
    );
    let err = Config::parse(&text).expect_err("invalid");
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(err.problems[0].starts_with("callers[1]"), "{err}");
    assert!(err.problems[0].contains("\"shared\""), "{err}");
}

#[test]
fn templates_are_parsed_apart_from_the_exact_entries() {
    let text = with_callers(
        r#"
        [[callers]]
        spiffe_id = "spiffe://corp.example/ns/portal/sa/portal"
        iam_user = "portal-svc"
        aws_profile = "portal-svc"
        [[callers]]
        spiffe_id = "spiffe://corp.example/ns/{ns}/sa/{sa}"
        iam_user = "svc-{ns}-{sa}"
        aws_profile = "{ns}-{sa}"
        [[callers]]
        dns_name = "{svc}.apps.corp.example"
        iam_user = "app-{svc}"
        aws_profile = "app-{svc}"
        [[callers]]
        spiffe_id = "spiffe://corp.example/batch/{job}"
        iam_user = "batch"
        aws_profile = "batch"
    "#,
    );
    let config = Config::parse(&text).expect("valid");
    assert_eq!(config.callers.len(), 1, "exact entries only");
    assert_eq!(config.callers[0].entry, 0);
    let entries: Vec<usize> = config.templates.iter().map(|t| t.entry).collect();
    assert_eq!(entries, [1, 2, 3]);
    let t = &config.templates[0];
    assert_eq!(&*t.identity.text, "spiffe://corp.example/ns/{ns}/sa/{sa}");
    let built = t.build(
        t.identity
            .matches("spiffe://corp.example/ns/a/sa/b")
            .expect("matches"),
    );
    assert_eq!(
        (
            built.iam_user.as_str(),
            built.aws_profile.as_deref().unwrap_or_default()
        ),
        ("svc-a-b", "a-b")
    );
}

#[test]
fn every_template_refusal_is_reported_at_once() {
    let entry = |id: &str, user: &str, profile: &str| {
        format!("[[callers]]\n{id}\niam_user = {user:?}\naws_profile = {profile:?}\n")
    };
    let long = "x".repeat(64);
    let entries = [
        // 0, 1: overlap (ns/team/sa/{sa} is also ns/{ns}/sa/{sa}).
        entry(
            r#"spiffe_id = "spiffe://corp/ns/{ns}/sa/{sa}""#,
            "svc-{ns}-{sa}",
            "{ns}-{sa}",
        ),
        entry(
            r#"spiffe_id = "spiffe://corp/ns/team/sa/{sa}""#,
            "team-{sa}",
            "team-{sa}",
        ),
        // 2: an undefined capture, in iam_user and in aws_profile.
        entry(r#"spiffe_id = "spiffe://corp/a/{x}""#, "u-{y}", "p-{z}"),
        // 3: a capture used twice.
        entry(r#"spiffe_id = "spiffe://corp/b/{x}/{x}""#, "u-{x}", "p-{x}"),
        // 4, 5, 6: malformed: unclosed, mixed with text, in the trust domain.
        entry(r#"spiffe_id = "spiffe://corp/c/{x""#, "u", "p4"),
        entry(r#"dns_name = "web-{x}.corp""#, "u-{x}", "p-{x}"),
        entry(r#"spiffe_id = "spiffe://{td}/d/{x}""#, "u-{x}", "p-{x}"),
        // 7, 8: an IAM user name no capture can make valid.
        entry(
            r#"spiffe_id = "spiffe://corp/e/{x}""#,
            &format!("{long}{{x}}"),
            "e-{x}",
        ),
        entry(r#"spiffe_id = "spiffe://corp/f/{x}""#, "svc/{x}", "f-{x}"),
        // 9: common_name has no templates.
        entry(r#"common_name = "{svc}.corp""#, "u-{svc}", "p-{svc}"),
        // 10: a profile that does not tell users apart.
        entry(r#"spiffe_id = "spiffe://corp/g/{x}""#, "g-{x}", "shared"),
        // 11: captures after a literal label.
        entry(r#"dns_name = "apps.{svc}.corp""#, "u-{svc}", "p-{svc}"),
        // 12: the rules for exact entries still hold beside templates.
        entry(r#"spiffe_id = "spiffe://corp/h?q""#, "h", "h"),
    ];
    let err = Config::parse(&with_callers(&entries.concat())).expect_err("invalid");
    let all = err.problems.join("\n");
    for needle in [
        "callers[1]: template \"spiffe://corp/ns/team/sa/{sa}\" and callers[0]'s template",
        "\"spiffe://corp/ns/team/sa/x\"",
        "callers[2].iam_user: \"u-{y}\" uses {y}, which the identity template does not capture",
        "callers[2].aws_profile: \"p-{z}\" uses {z}",
        "callers[3].spiffe_id: template \"spiffe://corp/b/{x}/{x}\" capture {x} is used twice",
        "callers[4].spiffe_id: template \"spiffe://corp/c/{x\" \"{x\" has a '{' that is not closed",
        "callers[5].dns_name: template \"web-{x}.corp\" label \"web-{x}\" mixes a capture",
        "callers[6].spiffe_id: template \"spiffe://{td}/d/{x}\" the trust domain cannot be a capture",
        "callers[7].iam_user: ",
        "is at least 65 characters long",
        "callers[8].iam_user: \"svc/{x}\" can never be a valid IAM user name: its literal text has '/'",
        "callers[9].common_name: \"{svc}.corp\": common_name has no templates",
        "callers[10].aws_profile: \"shared\" must use every capture iam_user uses (missing {x})",
        "callers[11].dns_name: template \"apps.{svc}.corp\" captures must be the leading labels",
        "callers[12].spiffe_id: \"spiffe://corp/h?q\" is not a SPIFFE ID",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(err.problems.len(), 13, "{all}");
}

#[test]
fn thousands_of_templates_are_checked_for_overlap_without_comparing_all_pairs() {
    let mut callers = String::new();
    for i in 0..10_000 {
        callers.push_str(&format!(
            "[[callers]]\nspiffe_id = \"spiffe://corp/team-{i}/{{svc}}\"\n\
             iam_user = \"t{i}-{{svc}}\"\naws_profile = \"t{i}-{{svc}}\"\n"
        ));
    }
    let config = Config::parse(&with_callers(&callers)).expect("no overlap");
    assert_eq!(config.templates.len(), 10_000);
    // One template that overlaps them all is found with each of them,
    // reported up to a bound.
    callers.push_str(
        "[[callers]]\nspiffe_id = \"spiffe://corp/{team}/api\"\niam_user = \"x-{team}\"\n\
         aws_profile = \"x-{team}\"\n",
    );
    let err = Config::parse(&with_callers(&callers)).expect_err("overlaps");
    assert!(
        err.problems[0].starts_with("callers[10000]: template"),
        "{}",
        err.problems[0]
    );
    assert!(
        err.problems
            .last()
            .is_some_and(|p| p.contains("more overlapping")),
        "{err}"
    );
}

#[test]
fn the_state_section_selects_a_backend_and_refuses_passwords_in_the_url() {
    let config = Config::parse(MINIMAL).expect("valid");
    assert_eq!(config.state.backend, StateBackend::Memory);
    assert_eq!(config.state.key_prefix, "credgate:");

    let redis = format!(
        "{MINIMAL}\n[state]\nurl = \"rediss://redis.svc:6380/2\"\nkey_prefix = \"team-a:\"\n\
         ca_file = \"ca.pem\"\ncommand_timeout = \"100ms\"\n"
    );
    let config = Config::parse(&redis).expect("valid");
    let StateBackend::Redis(r) = &config.state.backend else {
        panic!("redis");
    };
    assert_eq!(
        r.topology,
        Topology::Standalone("rediss://redis.svc:6380/2".into())
    );
    assert_eq!(r.command_timeout, Duration::from_millis(100));
    assert_eq!(config.state.key_prefix, "team-a:");

    let bad = format!(
        "{MINIMAL}\n[state]\nbackend = \"redis\"\nurl = \"redis://:hunter2@redis:6379\"\n\
         ca_file = \"ca.pem\"\nclient_cert = \"c.pem\"\nflavour = 1\n"
    );
    let err = Config::parse(&bad).expect_err("invalid");
    let all = err.problems.join("\n");
    for needle in [
        "state.flavour: unknown key",
        "state.url: must not carry a password",
        "state.ca_file: only applies to rediss://",
        "state.client_cert: only applies to rediss://",
        "state.client_cert and state.client_key",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert!(
        !all.contains("hunter2"),
        "the password is not echoed: {all}"
    );

    let memory_with_url =
        format!("{MINIMAL}\n[state]\nbackend = \"memory\"\nurl = \"redis://r\"\n");
    assert!(Config::parse(&memory_with_url).is_err());
}

#[test]
fn cluster_and_sentinel_layouts_are_parsed_and_checked_all_at_once() {
    let state = |body: &str| format!("{MINIMAL}\n[state]\n{body}\n");
    let cluster = Config::parse(&state(
        "cluster_nodes = [\"redis://r-0:6379\", \"redis://r-1:6379\"]\n\
         max_request_ids_per_caller = 50",
    ))
    .expect("valid");
    let StateBackend::Redis(r) = &cluster.state.backend else {
        panic!("redis");
    };
    assert_eq!(
        r.topology,
        Topology::Cluster(vec!["redis://r-0:6379".into(), "redis://r-1:6379".into()])
    );
    assert_eq!(cluster.state.max_request_ids_per_caller, 50);
    let sentinel = Config::parse(&state(
        "sentinels = [\"redis://s-0:26379\"]\nsentinel_master = \"credgate\"",
    ))
    .expect("valid");
    let StateBackend::Redis(r) = &sentinel.state.backend else {
        panic!("redis");
    };
    assert_eq!(
        r.topology,
        Topology::Sentinel {
            sentinels: vec!["redis://s-0:26379".into()],
            master: "credgate".into()
        }
    );

    let err = Config::parse(&state(
        "url = \"redis://a\"\ncluster_nodes = [\"redis://b\"]\nkey_prefix = \"x{y}:\"\n\
         max_request_ids_per_caller = 0",
    ))
    .expect_err("invalid");
    let all = err.problems.join("\n");
    for needle in [
        "state: set only one of url, cluster_nodes and sentinels",
        "state.key_prefix: \"x{y}:\" must not contain",
        "state.max_request_ids_per_caller: must be greater than zero",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    let err = Config::parse(&state(
        "cluster_nodes = [\"redis://a/3\", \"rediss://b\", \"http://c\", \"redis://:pw@d\"]",
    ))
    .expect_err("invalid");
    let all = err.problems.join("\n");
    for needle in [
        "state.cluster_nodes[0]: names database 3",
        "state.cluster_nodes[2]: \"http://c\" must start with redis://",
        "state.cluster_nodes[3]: must not carry a password",
        "state.cluster_nodes: mixes redis:// and rediss://",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert!(!all.contains("pw@"), "no password echoed: {all}");
    let err =
        Config::parse(&state("sentinels = []\ncommand_timeout = \"1s\"")).expect_err("invalid");
    let all = err.problems.join("\n");
    for needle in [
        "state.sentinel_master and state.sentinels: set both or neither",
        "state.sentinels: must list at least one",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    let err = Config::parse(&state("command_timeout = \"1s\"")).expect_err("invalid");
    assert!(
        err.problems[0].contains("state.command_timeout: only applies to the redis backend"),
        "{err}"
    );
}

#[test]
fn state_keys_carry_the_matcher_kind() {
    let keys = [
        Matcher::SpiffeId("spiffe://corp/ns/a/sa/a".into()),
        Matcher::DnsName("svc.corp".into()),
        Matcher::CommonName("svc.corp".into()),
    ]
    .map(|m| m.state_key());
    assert_eq!(
        keys,
        [
            "spiffe:spiffe://corp/ns/a/sa/a",
            "dns:svc.corp",
            "cn:svc.corp"
        ]
    );
}

#[test]
fn a_crl_is_one_file_or_a_list_of_files() {
    let one = MINIMAL.replace(
        "client_ca = \"ca.pem\"",
        "client_ca = \"ca.pem\"\ncrl = \"a.crl\"",
    );
    assert_eq!(Config::parse(&one).expect("valid").tls.crl.len(), 1);
    let two = MINIMAL.replace(
        "client_ca = \"ca.pem\"",
        "client_ca = \"ca.pem\"\ncrl = [\"root.crl\", \"issuing.crl\"]",
    );
    assert_eq!(Config::parse(&two).expect("valid").tls.crl.len(), 2);
    let wrong = MINIMAL.replace("client_ca = \"ca.pem\"", "client_ca = \"ca.pem\"\ncrl = 3");
    assert!(Config::parse(&wrong).is_err());
}

proptest::proptest! {
    #[test]
    fn parsing_never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
        let _ = Config::parse(&text);
    }

    #[test]
    fn parsing_never_panics_on_mutated_valid_configs(
        edits in proptest::collection::vec((proptest::sample::select(
            vec!["=", "\"", "[", "]", "\n", "0", "-1", "x", "spiffe://", "\u{0}", "[[callers]]"]
        ), proptest::prelude::any::<proptest::sample::Index>()), 1..6),
    ) {
        let mut text = MINIMAL.to_owned();
        for (insert, at) in edits {
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            text.insert_str(i, insert);
        }
        // Valid or not, every outcome is a value: invalid configs list
        // at least one problem.
        if let Err(e) = Config::parse(&text) {
            proptest::prop_assert!(!e.problems.is_empty());
        }
    }
}

/// A template's positions from `parts`: a literal from a small alphabet
/// (so that templates and identities collide often), or a capture.
fn template_path(parts: &[Option<String>]) -> String {
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| match p {
            Some(literal) => format!("/{literal}"),
            None => format!("/{{c{i}}}"),
        })
        .collect()
}

proptest::proptest! {
    /// Whatever set of templates the parser accepts, no identity is
    /// matched by two of them; whatever it refuses for overlap, some
    /// identity is.
    #[test]
    fn templates_the_parser_accepts_never_match_one_identity_together(
        templates in proptest::collection::vec(
            proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(None),
                    proptest::strategy::Strategy::prop_map("[ab]", Some),
                ],
                1..4,
            ),
            1..6,
        ),
        ids in proptest::collection::vec(proptest::collection::vec("[abc]", 1..4), 1..20),
    ) {
        use proptest::prelude::*;
        // Every entry a template: one capture at least.
        let templates: Vec<Vec<Option<String>>> = templates
            .into_iter()
            .map(|mut parts| {
                if parts.iter().all(Option::is_some) {
                    parts[0] = None;
                }
                parts
            })
            .collect();
        let callers: String = templates
            .iter()
            .enumerate()
            .map(|(i, parts)| {
                format!(
                    "[[callers]]\nspiffe_id = \"spiffe://td{}\"\niam_user = \"u{i}\"\n\
                     aws_profile = \"p{i}\"\n",
                    template_path(parts)
                )
            })
            .collect();
        match Config::parse(&with_callers(&callers)) {
            Ok(config) => {
                for id in &ids {
                    let id = format!("spiffe://td/{}", id.join("/"));
                    let matching = config
                        .templates
                        .iter()
                        .filter(|t| t.identity.matches(&id).is_ok())
                        .count();
                    prop_assert!(matching <= 1, "{} matched by {}", id, matching);
                }
            }
            Err(e) => {
                // The only way these entries can be wrong is an overlap, and
                // each reported one names an identity both templates match.
                for problem in &e.problems {
                    prop_assert!(problem.contains("could both match"), "{}", problem);
                }
                let witness = e.problems[0].split("(e.g. \"").nth(1).and_then(|w| w.split('"').next());
                let witness = witness.expect("a witness");
                let parsed: Vec<_> = templates
                    .iter()
                    .filter_map(|parts| {
                        super::templates::IdentityTemplate::parse(
                            TemplateKind::SpiffeId,
                            &format!("spiffe://td{}", template_path(parts)),
                        )
                        .ok()
                    })
                    .filter(|t| t.matches(witness).is_ok())
                    .collect();
                prop_assert!(parsed.len() >= 2, "{} is matched by {:?}", witness, parsed);
            }
        }
    }
}

#[test]
fn a_spiffe_id_must_use_the_spiffe_scheme() {
    let text = MINIMAL.replace("spiffe://corp.example/ns/a/sa/a", "https://a/b");
    let err = Config::parse(&text).expect_err("invalid");
    assert!(err.problems[0].contains("is not a SPIFFE ID"), "{err}");
}

#[test]
fn keys_default_to_the_profiles_source_with_the_designed_durations() {
    let config = Config::parse(MINIMAL).expect("valid");
    let keys = &config.keys;
    assert_eq!(keys.source, KeySource::Profiles);
    assert_eq!(keys.secret_name.template(), "credgate/{iam_user}");
    assert_eq!(keys.refresh, Duration::from_secs(60));
    assert_eq!(keys.rotate_after, Some(Duration::from_secs(30 * 86400)));
    assert_eq!(keys.old_key_grace, Duration::from_secs(600));
    assert_eq!(keys.warn_key_age, Duration::from_secs(90 * 86400));
    assert_eq!(config.callers[0].aws_profile.as_deref(), Some("a"));
}

const SECRETS_MANAGER: &str = r#"
    [tls]
    cert = "c.pem"
    key = "k.pem"
    client_ca = "ca.pem"
    [keys]
    source = "secretsmanager"
    secret_name = "prod/credgate/{iam_user}"
    refresh = "30s"
    rotate_after = "0s"
    old_key_grace = "5m"
    warn_key_age = "60d"
    [[callers]]
    spiffe_id = "spiffe://corp.example/ns/a/sa/a"
    iam_user = "a-svc"
"#;

#[test]
fn with_secrets_manager_callers_need_no_profile_and_rotation_can_be_off() {
    let config = Config::parse(SECRETS_MANAGER).expect("valid");
    let keys = &config.keys;
    assert_eq!(keys.source, KeySource::SecretsManager);
    assert_eq!(
        keys.secret_name.of("a-svc").as_deref(),
        Some("prod/credgate/a-svc")
    );
    assert_eq!(keys.refresh, Duration::from_secs(30));
    assert_eq!(keys.rotate_after, None, "\"0s\" is never");
    assert_eq!(keys.old_key_grace, Duration::from_secs(300));
    assert_eq!(keys.warn_key_age, Duration::from_secs(60 * 86400));
    assert_eq!(config.callers[0].aws_profile, None);
}

#[test]
fn every_key_custody_problem_is_reported_at_once() {
    let text = r#"
        [tls]
        cert = "c.pem"
        key = "k.pem"
        client_ca = "ca.pem"
        [keys]
        source = "secretsmanager"
        secret_name = "{iam_user}"
        refresh = "10m"
        rotate_after = "soon"
        old_key_grace = "5m"
        warn_key_age = "0s"
        [[callers]]
        spiffe_id = "spiffe://corp.example/ns/a/sa/a"
        iam_user = "a"
        aws_profile = "a"
        [[callers]]
        common_name = "b"
        iam_user = "b c"
    "#;
    let err = Config::parse(text).expect_err("invalid");
    let all = err.problems.join("\n");
    for needle in [
        "keys.secret_name: \"{iam_user}\" needs a fixed prefix",
        "keys.rotate_after: \"soon\" is not a duration",
        "keys.warn_key_age: must be greater than zero",
        "keys.old_key_grace (5m) must be at least twice keys.refresh (10m)",
        "callers[0].aws_profile: not used with keys.source = \"secretsmanager\"",
        "callers[1].iam_user: \"b c\" is not an IAM user name",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(err.problems.len(), 6, "{all}");
}

#[test]
fn with_secrets_manager_a_template_builds_the_user_and_no_profile() {
    let text = format!(
        "{SECRETS_MANAGER}
        [[callers]]
        spiffe_id = \"spiffe://corp.example/tpl/{{ns}}/sa/{{sa}}\"
        iam_user = \"svc-{{ns}}-{{sa}}\"
        "
    );
    let config = Config::parse(&text).expect("valid");
    let built = config.templates[0].build(
        config.templates[0]
            .identity
            .matches("spiffe://corp.example/tpl/pay/sa/api")
            .expect("matches"),
    );
    assert_eq!(built.iam_user, "svc-pay-api");
    assert_eq!(built.aws_profile, None, "the key is the user's secret");
    assert_eq!(
        config.keys.secret_name.of(&built.iam_user).as_deref(),
        Some("prod/credgate/svc-pay-api")
    );

    let with_profile = format!(
        "{SECRETS_MANAGER}
        [[callers]]
        dns_name = \"{{svc}}.apps.corp.example\"
        iam_user = \"app-{{svc}}\"
        aws_profile = \"app-{{svc}}\"
        "
    );
    let err = Config::parse(&with_profile).expect_err("invalid");
    assert_eq!(
        err.problems,
        [
            "callers[1].aws_profile: not used with keys.source = \"secretsmanager\" (the key is \
          the secret of iam_user); remove it"
        ]
    );
}

#[test]
fn secrets_manager_keys_are_refused_with_the_profiles_source() {
    let text = MINIMAL.replace(
        "[[callers]]",
        "[keys]\nsource = \"profiles\"\nrefresh = \"1m\"\nrotate_after = \"7d\"\n\
         warn_key_age = \"30d\"\n[[callers]]",
    );
    let err = Config::parse(&text).expect_err("invalid");
    assert_eq!(
        err.problems,
        [
            "keys.refresh: applies to source \"secretsmanager\" only (source is \"profiles\")",
            "keys.rotate_after: applies to source \"secretsmanager\" only (source is \"profiles\")",
        ]
    );
    let text = MINIMAL.replace("[[callers]]", "[keys]\nsource = \"vault\"\n[[callers]]");
    let err = Config::parse(&text).expect_err("invalid");
    assert_eq!(
        err.problems,
        ["keys.source: \"vault\" is not \"profiles\" or \"secretsmanager\""]
    );
}

#[test]
fn a_rotation_must_outlast_the_old_keys_grace() {
    let text = SECRETS_MANAGER.replace("rotate_after = \"0s\"", "rotate_after = \"5m\"");
    let err = Config::parse(&text).expect_err("invalid");
    assert_eq!(
        err.problems,
        [
            "keys.rotate_after (5m) must be longer than keys.old_key_grace (5m), or \"0s\" \
          (never): a rotation ends only once the old key is gone"
        ]
    );
    let text = MINIMAL.replace("    aws_profile = \"a\"\n", "");
    let err = Config::parse(&text).expect_err("invalid");
    assert_eq!(err.problems, ["callers[0].aws_profile: missing"]);
}

/// `docs/configuration.md`: for each `## `[section]`` heading, the keys in
/// the first column of its tables.
fn documented_keys() -> Vec<(String, Vec<String>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
    let text = std::fs::read_to_string(path).expect("docs/configuration.md");
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## `[") {
            let name = heading.trim_start_matches('[').trim_end_matches(['`', ']']);
            sections.push((name.to_owned(), Vec::new()));
        } else if let Some(row) = line.strip_prefix("| `")
            && let Some((_, keys)) = sections.last_mut()
        {
            let first_cell = row.split(" |").next().unwrap_or_default();
            keys.extend(
                format!("`{first_cell}")
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_owned),
            );
        }
    }
    sections
}

#[test]
fn the_configuration_reference_lists_exactly_the_keys_the_parser_knows() {
    let documented = documented_keys();
    let names: Vec<&str> = documented.iter().map(|(name, _)| name.as_str()).collect();
    let parsed: Vec<&str> = SECTIONS.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, parsed, "sections of docs/configuration.md, in order");
    for ((section, keys), (_, known)) in documented.iter().zip(SECTIONS) {
        let mut keys = keys.clone();
        keys.sort();
        let mut known: Vec<String> = known.iter().map(|k| (*k).to_owned()).collect();
        known.sort();
        assert_eq!(keys, known, "keys of [{section}] in docs/configuration.md");
    }
}
