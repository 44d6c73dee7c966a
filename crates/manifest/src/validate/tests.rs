//! Each manifest error and the message a user sees for it.

use std::path::Path;
use std::time::Duration;

use crate::{
    AclEffect, Auth, Data, ForwardedHeader, Manifest, MeshMode, PLATFORM_NAMES, Run, Shape,
};

const GOOD: &str = r#"
name = "shop"

[gateway]
listen = "127.0.0.1:9090"
timeout = "5s"

[services.catalog]
run = { cargo = "shop-catalog" }
replicas = 2
data = "sqlite"
routes = [{ path = "/api/catalog/**", methods = ["GET"] }]

[services.pricing]
shape = "function"
run = { cargo = "shop-pricing" }
scale = { max = 3, concurrency = 8, idle = "2s" }
routes = [{ path = "/api/pricing/**", methods = ["POST"], timeout = "3s" }]

[services.orders]
run = { command = ["python3", "-m", "http.server"] }
scale = { min = 1, max = 4, target_concurrency = 20 }
calls = ["catalog", "pricing"]
env = { GREETING = "hi" }
liveness_timeout = "1m"
routes = [
  { path = "/api/orders/**", methods = ["GET", "POST"], auth = "public" },
]
"#;

fn errors(src: &str) -> String {
    match Manifest::parse(src, Path::new("flotilla.toml")) {
        Ok(m) => panic!("expected errors, got {m:#?}"),
        Err(e) => e.to_string(),
    }
}

fn with_service(extra: &str) -> String {
    format!("name = \"shop\"\n[services.a]\nrun = {{ cargo = \"a\" }}\n{extra}\n")
}

#[test]
fn a_good_manifest_parses_with_defaults() {
    let m = Manifest::parse(GOOD, Path::new("flotilla.toml")).unwrap();
    assert_eq!(m.name, "shop");
    assert_eq!(m.gateway.listen.to_string(), "127.0.0.1:9090");
    let catalog = &m.services["catalog"];
    assert_eq!(catalog.shape, Shape::Service);
    assert_eq!((catalog.scale.min, catalog.scale.max), (2, 2));
    assert_eq!(catalog.data, Data::Sqlite);
    assert_eq!(
        catalog.routes[0].timeout.as_secs(),
        5,
        "gateway default timeout"
    );
    let pricing = &m.services["pricing"];
    assert_eq!(pricing.shape, Shape::Function);
    assert_eq!(
        (
            pricing.scale.min,
            pricing.scale.max,
            pricing.scale.concurrency
        ),
        (0, 3, 8)
    );
    assert_eq!(pricing.scale.idle.as_secs(), 2);
    assert_eq!(pricing.routes[0].timeout.as_secs(), 3);
    let orders = &m.services["orders"];
    assert_eq!(orders.calls, ["catalog", "pricing"]);
    assert_eq!(orders.liveness_timeout, Duration::from_secs(60));
    assert_eq!(catalog.liveness_timeout, Duration::from_secs(30), "default");
    assert_eq!(orders.routes[0].auth, Auth::Public);
    assert!(matches!(&orders.run, Run::Command { argv, .. } if argv[0] == "python3"));
    assert_eq!(m.routes().count(), 3);
}

#[test]
fn unknown_key_names_the_place_and_suggests() {
    let e = errors(&with_service("replica = 2"));
    assert!(e.contains("error: unknown key `replica`"), "{e}");
    assert!(e.contains("--> flotilla.toml:4:1"), "{e}");
    assert!(e.contains("help: did you mean `replicas`?"), "{e}");
}

#[test]
fn unknown_top_level_key() {
    let e = errors("name = \"x\"\nservcies = 1\n");
    assert!(e.contains("unknown key `servcies`"), "{e}");
    assert!(e.contains("did you mean `services`?"), "{e}");
}

#[test]
fn malformed_toml() {
    let e = errors("name = \"shop\n");
    assert!(e.contains("--> flotilla.toml:1:"), "{e}");
}

#[test]
fn missing_name() {
    let e = errors("[services.a]\nrun = { cargo = \"a\" }\n");
    assert!(e.contains("missing key `name`"), "{e}");
    assert!(e.contains("add `name = \"my-system\"`"), "{e}");
}

#[test]
fn call_to_undeclared_service() {
    let e = errors(&format!(
        "{}calls = [\"pricng\"]\n[services.pricing]\nrun = {{ cargo = \"p\" }}\n",
        with_service("")
    ));
    assert!(
        e.contains("`a` calls `pricng`, which is not a service of this system"),
        "{e}"
    );
    assert!(e.contains("did you mean `pricing`?"), "{e}");
    assert!(e.contains("flotilla.toml:5:10"), "{e}");
}

#[test]
fn duplicate_routes_across_services() {
    let src = r#"name = "x"
[services.a]
run = { cargo = "a" }
routes = [{ path = "/api/**", methods = ["GET"] }]
[services.b]
run = { cargo = "b" }
routes = [{ path = "/api/**/", methods = ["GET", "POST"] }]
"#;
    let e = errors(src);
    assert!(
        e.contains("route `/api/**/` is also declared by service `a` for the same methods"),
        "{e}"
    );
    assert!(e.contains("flotilla.toml:7:"), "{e}");
}

#[test]
fn same_path_different_methods_is_fine() {
    let src = r#"name = "x"
[services.a]
run = { cargo = "a" }
routes = [{ path = "/api/**", methods = ["GET"] }]
[services.b]
run = { cargo = "b" }
routes = [{ path = "/api/**", methods = ["POST"] }]
"#;
    Manifest::parse(src, Path::new("flotilla.toml")).unwrap();
}

#[test]
fn the_same_path_on_other_hosts_is_fine_and_on_a_shared_host_clashes() {
    let src = r#"name = "x"
[services.a]
run = { cargo = "a" }
routes = [
  { path = "/api/**" },
  { path = "/api/**", hosts = ["A.example.com", "*.eu.example.com"] },
]
[services.b]
run = { cargo = "b" }
routes = [{ path = "/api/**", hosts = ["b.example.com", "*.example.com"] }]
"#;
    let m = Manifest::parse(src, Path::new("flotilla.toml")).unwrap();
    let hosts: Vec<Vec<String>> = m
        .routes()
        .map(|(_, r)| r.hosts.iter().map(ToString::to_string).collect())
        .collect();
    assert_eq!(
        hosts,
        [
            vec![],
            vec!["a.example.com".to_string(), "*.eu.example.com".to_string()],
            vec!["b.example.com".to_string(), "*.example.com".to_string()],
        ]
    );
    let clash = src.replace("\"b.example.com\"", "\"a.example.com\"");
    let e = errors(&clash);
    assert!(
        e.contains("route `/api/**` is also declared by service `a` for the same methods"),
        "{e}"
    );
    assert!(e.contains("own path or hosts"), "{e}");
}

#[test]
fn bad_hosts_say_what_to_write() {
    let cases = [
        ("hosts = []", "`hosts = []` matches no request"),
        (
            "hosts = [\"*\"]",
            "invalid host `*`: `*` alone matches every host: leave `hosts` out instead",
        ),
        ("hosts = [\"a.com:8443\"]", "`a.com:8443` has a port"),
        (
            "hosts = [\"a.*.com\"]",
            "`*` may only be the whole first label",
        ),
        ("hosts = [\"a_b.com\"]", "`a_b.com` is not a DNS name"),
        (
            "hosts = [\"a.com\", \"A.com\"]",
            "host `a.com` is listed twice",
        ),
    ];
    for (hosts, want) in cases {
        let e = errors(&with_service(&format!(
            "routes = [{{ path = \"/a\", {hosts} }}]"
        )));
        assert!(e.contains(want), "{hosts}: {e}");
        assert!(e.contains("flotilla.toml:4:"), "{hosts}: {e}");
    }
}

#[test]
fn strip_prefix_must_be_how_the_path_starts() {
    let m = Manifest::parse(
        &with_service(r#"routes = [{ path = "/t/*/orders/**", strip_prefix = "/t/*/" }]"#),
        Path::new("flotilla.toml"),
    )
    .unwrap();
    let route = &m.services["a"].routes[0];
    assert_eq!(
        route.strip_prefix.as_ref().map(|p| p.as_str()),
        Some("/t/*/")
    );
    assert_eq!(route.forwarded_pattern().as_str(), "/orders/**");
    let cases = [
        (
            "/t/acme",
            "`strip_prefix = \"/t/acme\"` is not how the route's path `/t/*/orders/**` starts",
        ),
        ("/t/*/orders/**", "is not how the route's path"),
        ("/", "`strip_prefix = \"/\"` strips nothing"),
        (
            "t",
            "invalid `strip_prefix` `t`: a path pattern must start with `/`",
        ),
    ];
    for (prefix, want) in cases {
        let e = errors(&with_service(&format!(
            "routes = [{{ path = \"/t/*/orders/**\", strip_prefix = \"{prefix}\" }}]"
        )));
        assert!(e.contains(want), "{prefix}: {e}");
        assert!(e.contains("flotilla.toml:4:"), "{prefix}: {e}");
    }
    let e = errors(&with_service(
        r#"routes = [{ path = "/t/*/orders/**", strip_prefix = "/x" }]"#,
    ));
    assert!(e.contains("e.g. `strip_prefix = \"/t\"`"), "{e}");
}

/// `catalog` with one route, written with `keys` (`split = { … }`, say),
/// beside `catalog-v2` and `catalog-v3`: the services a split or a mirror
/// may name. The route is on line 4.
fn catalogs(keys: &str) -> String {
    format!(
        "name = \"x\"\n[services.catalog]\nrun = {{ cargo = \"c\" }}\nroutes = [{{ path = \"/api/catalog/**\", {keys} }}]\n[services.catalog-v2]\nrun = {{ cargo = \"c2\" }}\n[services.catalog-v3]\nrun = {{ cargo = \"c3\" }}\n"
    )
}

/// Each of `keys` is refused with its message, pointing at the route.
fn refused_on_the_route(cases: &[(&str, &str)]) {
    for (keys, want) in cases {
        let e = errors(&catalogs(keys));
        assert!(e.contains(want), "{keys}: {e}");
        assert!(e.contains("flotilla.toml:4:"), "{keys}: {e}");
    }
}

#[test]
fn a_split_names_other_services_with_shares_of_100_at_most() {
    let m = parses(&catalogs("split = { catalog-v2 = 10, catalog-v3 = 0 }"));
    let split = &m.services["catalog"].routes[0].split;
    assert_eq!(split.get("catalog-v2"), Some(&10));
    assert_eq!(split.get("catalog-v3"), Some(&0));
    for service in ["catalog", "catalog-v2", "catalog-v3"] {
        assert_eq!(m.routes_reaching(service).count(), 1, "{service}");
    }
    refused_on_the_route(&[
        (
            "split = { catalog-v2 = 10, catalog = 5 }",
            "`split` names `catalog`, the route's own service",
        ),
        (
            "split = { catalog-v2 = 10, catalog-v4 = 5 }",
            "did you mean `catalog-v2`?",
        ),
        ("split = { catalog-v2 = 101 }", "`catalog-v2` gets 101%"),
        ("split = { catalog-v2 = -1 }", "`catalog-v2` gets -1%"),
        (
            "split = { catalog-v2 = 60, catalog-v3 = 50 }",
            "`split` gives away 110% of the route's requests",
        ),
    ]);
}

#[test]
fn compression_takes_defaults_and_refuses_what_it_cannot_compress() {
    let with =
        |table: &str| format!("name = \"x\"\n{table}\n[services.a]\nrun = {{ cargo = \"a\" }}\n");
    let parsed = |table: &str| match Manifest::parse(&with(table), Path::new("flotilla.toml")) {
        Ok(m) => m.gateway.compression,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        parsed("[gateway.compression]"),
        Some(crate::Compression::default())
    );
    assert_eq!(parsed(""), None);
    let c = parsed(
        "[gateway.compression]\nmin_bytes = 0\nlevel = 9\ntypes = [\"Text/*\", \"application/json\"]",
    );
    let c = c.unwrap_or_default();
    assert_eq!((c.min_bytes, c.level), (0, 9));
    assert_eq!(c.types, ["text/*", "application/json"]);
    for (line, want) in [
        ("level = 0", "`level = 0` is out of range"),
        ("min_bytes = -1", "`min_bytes = -1` is out of range"),
        ("types = []", "`types = []` compresses nothing"),
        (
            "types = [\"*/*\"]",
            "`*/*` is not a media type the gateway can compress",
        ),
        (
            "types = [\"application/json; charset=utf-8\"]",
            "is not a media type",
        ),
        ("types = [\"json\"]", "`json` is not a media type"),
        (
            "types = [\"text/*\", \"TEXT/*\"]",
            "`text/*` is listed twice",
        ),
        ("gzip = true", "unknown key `gzip`"),
    ] {
        let e = errors(&with(&format!("[gateway.compression]\n{line}")));
        assert!(e.contains(want), "{line}: {e}");
        assert!(e.contains("flotilla.toml:3:"), "{line}: {e}");
    }
    // A route may opt out; the rest are compressed.
    let m = match Manifest::parse(
        &format!(
            "{}routes = [{{ path = \"/account/**\", compress = false }}, {{ path = \"/api/**\" }}]\n",
            with("[gateway.compression]")
        ),
        Path::new("flotilla.toml"),
    ) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    let compress: Vec<bool> = m.services["a"].routes.iter().map(|r| r.compress).collect();
    assert_eq!(compress, [false, true]);
}

#[test]
fn a_mirror_names_other_services_each_with_a_share() {
    let m = parses(&catalogs("mirror = { catalog-v2 = 100, catalog-v3 = 10 }"));
    let mirror = &m.services["catalog"].routes[0].mirror;
    assert_eq!(mirror.get("catalog-v2"), Some(&100));
    assert_eq!(mirror.get("catalog-v3"), Some(&10));
    // Their ACLs let the gateway in on the route.
    assert_eq!(m.routes_reaching("catalog-v3").count(), 1);
    refused_on_the_route(&[
        (
            "mirror = { catalog = 5 }",
            "`mirror` names `catalog`, the route's own service",
        ),
        ("mirror = { catalog-v4 = 5 }", "did you mean `catalog-v2`?"),
        ("mirror = { catalog-v2 = 101 }", "`catalog-v2` gets 101%"),
    ]);
}

#[test]
fn a_route_s_own_retries_are_0_to_10() {
    let m = parses(&catalogs("retries = 0"));
    assert_eq!(m.services["catalog"].routes[0].retries, Some(0));
    assert_eq!(
        parses(&catalogs("methods = [\"GET\"]")).services["catalog"].routes[0].retries,
        None
    );
    refused_on_the_route(&[
        ("retries = 11", "`retries = 11` is out of range"),
        ("retries = -1", "`retries = -1` is out of range"),
    ]);
}

#[test]
fn a_route_s_try_timeout_is_shorter_than_its_timeout() {
    let m = parses(&catalogs("timeout = \"5s\", try_timeout = \"500ms\""));
    assert_eq!(
        m.services["catalog"].routes[0].try_timeout,
        Some(Duration::from_millis(500))
    );
    assert_eq!(
        parses(&catalogs("methods = [\"GET\"]")).services["catalog"].routes[0].try_timeout,
        None
    );
    refused_on_the_route(&[
        (
            "try_timeout = \"30s\"",
            "`try_timeout` (30s) must be shorter than the route's `timeout` (15s)",
        ),
        (
            "timeout = \"1s\", try_timeout = \"2s\"",
            "must be shorter than the route's `timeout` (1s)",
        ),
        (
            "try_timeout = \"0s\"",
            "`try_timeout` must be longer than zero",
        ),
        ("try_timeout = \"soon\"", "`soon` is not a duration"),
    ]);
}

#[test]
fn invalid_values() {
    let cases = [
        (
            "shape = \"fucntion\"",
            "unknown shape `fucntion`",
            "did you mean `shape = \"function\"`?",
        ),
        (
            "replicas = 0",
            "`replicas = 0` is out of range",
            "use a whole number from 1 to 64",
        ),
        (
            "data = \"postgress\"",
            "unknown data kind `postgress`",
            "write `data = \"sqlite\"`",
        ),
        (
            "ready_timeout = \"soon\"",
            "`soon` is not a duration",
            "such as",
        ),
        (
            "routes = [{ path = \"/a\", compress = false }]",
            "`compress` needs `[gateway.compression]`",
            "or leave `compress` out",
        ),
        (
            "liveness_timeout = \"0s\"",
            "`liveness_timeout` must be longer than zero",
            "liveness_timeout = \"30s\"",
        ),
        (
            "routes = [{ path = \"api\" }]",
            "invalid route path `api`: a path pattern must start with `/`",
            "`**` the rest",
        ),
        (
            "routes = [{ path = \"/a\", methods = [\"get\"] }]",
            "method `get` must be upper case",
            "write `\"GET\"`",
        ),
        (
            "routes = [{ path = \"/a\", methods = [\"FETCH\"] }]",
            "`FETCH` is not an HTTP method",
            "use one of",
        ),
        (
            "routes = [{ path = \"/healthz\" }]",
            "answered by the gateway itself",
            "another path",
        ),
        (
            "env = { FLOTILLA_SERVICE = \"x\" }",
            "set by the runtime",
            "runtime-contract",
        ),
        (
            "env = { OTEL_RESOURCE_ATTRIBUTES = \"team=shop\" }",
            "`OTEL_RESOURCE_ATTRIBUTES` is set by the runtime and cannot be overridden",
            "runtime-contract",
        ),
        (
            "env = { OTEL_SERVICE_NAME = \"cat\" }",
            "`OTEL_SERVICE_NAME` is set by the runtime and cannot be overridden",
            "runtime-contract",
        ),
        (
            "scale = { min = 3, max = 2 }",
            "`max = 2` is below `min = 3`",
            "raise `max`",
        ),
        (
            "replicas = 2\nscale = { max = 3 }",
            "`replicas` and `scale` both set",
            "keep `replicas",
        ),
        ("calls = [\"a\"]", "lists itself", "remove it"),
    ];
    for (extra, message, help) in cases {
        let e = errors(&with_service(extra));
        assert!(e.contains(message), "{extra}: {e}");
        assert!(e.contains(help), "{extra}: {e}");
        assert!(e.contains("--> flotilla.toml:4:"), "{extra}: {e}");
    }
}

#[test]
fn function_rejects_replicas() {
    let e = errors(
        "name = \"x\"\n[services.f]\nshape = \"function\"\nrun = { cargo = \"f\" }\nreplicas = 2\n",
    );
    assert!(e.contains("a function has no fixed `replicas`"), "{e}");
}

#[test]
fn run_must_name_one_thing() {
    let e = errors("name = \"x\"\n[services.a]\nrun = { cargo = \"a\", command = [\"b\"] }\n");
    assert!(e.contains("`run` has both `cargo` and `command`"), "{e}");
    let e = errors("name = \"x\"\n[services.a]\nroutes = []\n");
    assert!(e.contains("service `a` has no `run`"), "{e}");
    let e = errors("name = \"x\"\n[services.a]\nrun = { command = [] }\n");
    assert!(e.contains("`command` is empty"), "{e}");
}

#[test]
fn bad_names() {
    let e = errors("name = \"Shop\"\n[services.a]\nrun = { cargo = \"a\" }\n");
    assert!(
        e.contains("system name `Shop` must start with a lower-case letter"),
        "{e}"
    );
    let e = errors("name = \"shop\"\n[services.Cat_1]\nrun = { cargo = \"a\" }\n");
    assert!(e.contains("service name `Cat_1`"), "{e}");
}

#[test]
fn all_errors_are_reported_at_once() {
    let e = errors(&with_service("replicas = 0\ndata = \"nope\""));
    assert!(e.ends_with("2 errors in manifest"), "{e}");
}

/// A route or ACL path no request could reach is refused where it is
/// written: the gateway answers 400 to `;` and `\\`, non-ASCII arrives
/// percent-encoded, and `{id}`/`:id` would match only themselves.
#[test]
fn paths_no_request_could_match_are_refused() {
    for (path, says) in [
        (
            "/users/{id}",
            "`{id}` is not a placeholder here: it would match only itself; use `*` for one segment",
        ),
        ("/users/:id", "`:id` is not a placeholder here"),
        (
            "/a;b",
            "`a;b` contains characters that are not allowed in a path",
        ),
        (
            "/a\\\\b",
            "contains characters that are not allowed in a path",
        ),
        ("/caf\u{e9}", "has characters clients send percent-encoded"),
    ] {
        let e = errors(&with_service(&format!(
            "routes = [{{ path = \"{path}\" }}]"
        )));
        assert!(e.contains(says), "{path}: {e}");
        assert!(e.contains("--> flotilla.toml:4:20"), "{path}: {e}");
        assert!(e.contains("`*` is one segment"), "{path}: {e}");
        let e = errors(&format!(
            "name = \"x\"\n[services.a]\nrun = {{ cargo = \"a\" }}\ncalls = [\"b\"]\n[services.b]\nrun = {{ cargo = \"b\" }}\nacl = [{{ caller = \"a\", path = \"{path}\" }}]\n"
        ));
        assert!(e.contains("invalid ACL path"), "{path}: {e}");
        assert!(e.contains(says), "{path}: {e}");
    }
    // The example system still parses.
    let shop = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shop/flotilla.toml");
    if let Err(e) = Manifest::load(&shop) {
        panic!("{e}");
    }
}

/// One invalid `[gateway]` section neither hides the others' errors nor
/// makes the routes that lean on a valid one look wrong.
#[test]
fn a_bad_gateway_section_leaves_the_others_checked_and_the_routes_alone() {
    let jwt = "jwt = { issuer = \"https://id.example.com\", audiences = [\"shop\"], jwks = \"https://id.example.com/jwks.json\" }";
    let e = errors(&format!(
        "name = \"x\"\n[gateway]\ntimeout = \"10\"\n{jwt}\n[services.a]\nrun = {{ cargo = \"a\" }}\nroutes = [{{ path = \"/a/**\", auth = \"jwt\", scopes = [\"read\"] }}]\n"
    ));
    assert!(e.contains("`10` is not a duration"), "{e}");
    assert!(!e.contains("needs `[gateway.jwt]`"), "{e}");
    assert!(e.ends_with("1 error in manifest"), "{e}");

    // Two sections wrong: both are reported, and a route leaning on the
    // broken one gets no second, misleading error.
    let e = errors(
        "name = \"x\"\n[gateway]\ntimeout = \"10\"\n[gateway.compression]\nmin_bytes = -1\n[services.a]\nrun = { cargo = \"a\" }\nroutes = [{ path = \"/a/**\", compress = false, try_timeout = \"20s\" }]\n",
    );
    assert!(e.contains("`10` is not a duration"), "{e}");
    assert!(e.contains("min_bytes"), "{e}");
    assert!(!e.contains("needs `[gateway.compression]`"), "{e}");
    assert!(!e.contains("try_timeout"), "{e}");
    assert!(e.ends_with("2 errors in manifest"), "{e}");
}

#[test]
fn bad_listen_address() {
    let e = errors(
        "name = \"x\"\n[gateway]\nlisten = \"localhost\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    );
    assert!(e.contains("`localhost` is not a socket address"), "{e}");
    assert!(e.contains("--> flotilla.toml:3:10"), "{e}");
}

#[test]
fn missing_static_dir() {
    let e = errors(
        "name = \"x\"\n[gateway]\nstatic = \"no-such-dir\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    );
    assert!(e.contains("static directory"), "{e}");
    assert!(e.contains("does not exist"), "{e}");
}

/// `static = "."` would serve the manifest and `.flotilla` (CA keys,
/// control token), and `".."` or an absolute parent the same.
#[test]
fn a_static_directory_holding_the_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("sys");
    std::fs::create_dir_all(nested.join("web")).unwrap();
    let manifest = nested.join("flotilla.toml");
    for served in [".", "..", "./", nested.to_str().unwrap()] {
        let src = format!(
            "name = \"x\"\n[gateway]\nstatic = {served:?}\n[services.a]\nrun = {{ cargo = \"a\" }}\n"
        );
        let e = match Manifest::parse(&src, &manifest) {
            Ok(_) => panic!("static = {served:?} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("holds the manifest's own directory"),
            "{served}: {e}"
        );
        assert!(e.contains("static = \"web\""), "{e}");
    }
    let src = "name = \"x\"\n[gateway]\nstatic = \"web\"\n[services.a]\nrun = { cargo = \"a\" }\n";
    let m = Manifest::parse(src, &manifest).unwrap();
    assert_eq!(m.gateway.static_dir, Some(nested.join("web")));
}

#[test]
fn find_walks_up() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::write(dir.path().join("flotilla.toml"), GOOD).unwrap();
    assert_eq!(
        Manifest::find(&nested).unwrap(),
        dir.path()
            .join("a/b/../../flotilla.toml")
            .components()
            .collect::<std::path::PathBuf>()
            .canonicalize()
            .unwrap_or_else(|_| dir.path().join("flotilla.toml"))
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(
        Manifest::find(empty.path())
            .unwrap_err()
            .to_string()
            .contains("no flotilla.toml")
    );
}

#[test]
fn mesh_defaults_and_settings() {
    let m = Manifest::parse(GOOD, Path::new("flotilla.toml")).unwrap();
    assert_eq!(m.mesh.mode, MeshMode::Enforce);
    assert_eq!(m.mesh.leaf_lifetime.as_secs(), 24 * 60 * 60);
    let src = format!("{GOOD}\n[mesh]\nmode = \"audit\"\nleaf_lifetime = \"5s\"\n");
    let m = Manifest::parse(&src, Path::new("flotilla.toml")).unwrap();
    assert_eq!(m.mesh.mode, MeshMode::Audit);
    assert_eq!(m.mesh.leaf_lifetime.as_secs(), 5);
}

#[test]
fn bad_mesh_settings() {
    let src = "name = \"x\"\n[mesh]\nmode = \"audits\"\n[services.a]\nrun = { cargo = \"a\" }\n";
    let e = errors(src);
    assert!(e.contains("unknown mesh mode `audits`"), "{e}");
    assert!(e.contains("did you mean `mode = \"audit\"`?"), "{e}");
    assert!(e.contains("--> flotilla.toml:3:8"), "{e}");
    let src =
        "name = \"x\"\n[mesh]\nleaf_lifetime = \"1s\"\n[services.a]\nrun = { cargo = \"a\" }\n";
    let e = errors(src);
    assert!(
        e.contains("`leaf_lifetime = \"1s\"` is out of range"),
        "{e}"
    );
    assert!(e.contains("from 5s to 365d"), "{e}");
    assert!(e.contains("--> flotilla.toml:3:17"), "{e}");
    let src = "name = \"x\"\n[mesh]\nenabled = false\n[services.a]\nrun = { cargo = \"a\" }\n";
    let e = errors(src);
    assert!(e.contains("unknown key `enabled`"), "{e}");
}

const ACL: &str = r#"name = "shop"
[services.catalog]
run = { cargo = "c" }
routes = [{ path = "/api/catalog/**", methods = ["GET"] }]
acl = [
  { caller = "orders", path = "/api/catalog/**", methods = ["GET"] },
  { caller = "orders", path = "/api/catalog/admin/**", effect = "deny" },
  { caller = "gateway", path = "/api/catalog/internal/**", effect = "deny" },
]
[services.orders]
run = { cargo = "o" }
calls = ["catalog"]
"#;

#[test]
fn acl_rules_parse() {
    let m = Manifest::parse(ACL, Path::new("flotilla.toml")).unwrap();
    let acl = &m.services["catalog"].acl;
    assert_eq!(acl.len(), 3);
    assert_eq!(acl[0].caller, "orders");
    assert_eq!(acl[0].pattern.as_str(), "/api/catalog/**");
    assert_eq!(acl[0].methods, ["GET"]);
    assert_eq!(acl[0].effect, AclEffect::Allow);
    assert_eq!(acl[1].effect, AclEffect::Deny);
    assert!(acl[1].methods.is_empty());
    assert_eq!(acl[2].caller, "gateway");
    assert!(m.services["orders"].acl.is_empty());
}

#[test]
fn acl_rule_naming_an_unknown_service_points_at_it() {
    let src = ACL.replace(
        "{ caller = \"orders\", path = \"/api/catalog/**\"",
        "{ caller = \"ordres\", path = \"/api/catalog/**\"",
    );
    let e = errors(&src);
    assert!(
        e.contains("ACL rule names `ordres`, which is not a service of this system"),
        "{e}"
    );
    assert!(e.contains("--> flotilla.toml:6:14"), "{e}");
    assert!(e.contains("did you mean `orders`?"), "{e}");
    assert!(e.ends_with("1 error in manifest"), "{e}");
}

#[test]
fn acl_rules_refine_calls_and_cannot_widen_the_platform() {
    let cases = [
        (
            "[services.pricing]\nrun = { cargo = \"p\" }\nacl = [{ caller = \"catalog\", path = \"/**\" }]\n",
            "ACL rule names `catalog`, which does not call `pricing`",
            "add \"pricing\" to `calls` of service `catalog`",
            "flotilla.toml:15:19",
        ),
        (
            "[services.pricing]\nrun = { cargo = \"p\" }\nacl = [{ caller = \"gateway\", path = \"/admin\" }]\n",
            "the gateway reaches exactly the routes of `pricing`",
            "write `effect = \"deny\"`",
            "flotilla.toml:15:19",
        ),
        (
            "[services.pricing]\nrun = { cargo = \"p\" }\nacl = [{ caller = \"runtime\", path = \"/**\", effect = \"allow\" }]\n",
            "the runtime reaches exactly `/healthz`, `/readyz` and `/metrics`",
            "write `effect = \"deny\"`",
            "flotilla.toml:15:19",
        ),
        (
            "[services.pricing]\nrun = { cargo = \"p\" }\nacl = [{ caller = \"pricing\", path = \"/**\" }]\n",
            "names `pricing` itself",
            "remove it",
            "flotilla.toml:15:19",
        ),
        (
            "[services.pricing]\nrun = { cargo = \"p\" }\nacl = [{ caller = \"gateway\", path = \"/**\", effect = \"deney\" }]\n",
            "unknown ACL effect `deney`",
            "did you mean `effect = \"deny\"`?",
            "flotilla.toml:15:",
        ),
        (
            "[services.pricing]\nrun = { cargo = \"p\" }\nacl = [{ caller = \"gateway\", path = \"admin\", effect = \"deny\" }]\n",
            "invalid ACL path `admin`",
            "`**` the rest",
            "flotilla.toml:15:",
        ),
        (
            "[services.pricing]\nrun = { cargo = \"p\" }\nacl = [{ caller = \"gateway\", path = \"/a\", methods = [\"get\"], effect = \"deny\" }]\n",
            "method `get` must be upper case",
            "write `\"GET\"`",
            "flotilla.toml:15:",
        ),
        (
            "[services.pricing]\nrun = { cargo = \"p\" }\nacl = [{ caller = \"gateway\", path = \"/a\", methods = [], effect = \"deny\" }]\n",
            "`methods = []` would make the rule match nothing",
            "leave `methods` out",
            "flotilla.toml:15:",
        ),
        (
            "[services.pricing]\nrun = { cargo = \"p\" }\nacl = [{ caller = \"gateway\", path = \"/a\", verb = \"GET\" }]\n",
            "unknown key `verb`",
            "the keys allowed here are `caller`, `path`, `methods`, `effect`",
            "flotilla.toml:15:",
        ),
    ];
    for (extra, message, help, place) in cases {
        let e = errors(&format!("{ACL}{extra}"));
        assert!(e.contains(message), "{extra}: {e}");
        assert!(e.contains(help), "{extra}: {e}");
        assert!(e.contains(place), "{extra}: {e}");
    }
}

#[test]
fn platform_names_are_reserved() {
    for name in PLATFORM_NAMES {
        let e = errors(&format!(
            "name = \"x\"\n[services.{name}]\nrun = {{ cargo = \"a\" }}\n"
        ));
        assert!(
            e.contains(&format!(
                "service name `{name}` is reserved for the platform's own identity"
            )),
            "{e}"
        );
        assert!(e.contains("--> flotilla.toml:2:11"), "{e}");
    }
}

const EDGE: &str = r#"
name = "shop"
[gateway]
jwt = { issuer = "shop-accounts", audiences = ["shop"], jwks = "accounts:/.well-known/jwks.json", forward_claims = ["email"] }
cors = { origins = ["http://localhost:8080"], credentials = true, max_age = "5m" }
ip = { allow = ["127.0.0.0/8", "::1"], trusted_proxies = ["10.0.0.1"], proxy_protocol = true }
rate_limits = { store = "redis", url = "redis://127.0.0.1:6379" }
response_headers = { set = { "X-Frame-Options" = "DENY", "x-content-type-options" = "nosniff" }, remove = ["X-Powered-By"] }
[services.accounts]
run = { cargo = "shop-accounts" }
routes = [{ path = "/api/accounts/login", methods = ["POST"], rate_limit = "5/m burst 10 per ip", cors = { origins = ["https://id.example"], headers = ["content-type"] } }]
[services.orders]
run = { cargo = "shop-orders" }
routes = [{ path = "/api/orders/**", auth = "jwt", scopes = ["orders:write"], claims = { tier = ["gold", "silver"], email_verified = true, "realm_access.roles" = "buyer", level = 3 }, request_headers = { set = { "x-api-version" = " 2 " }, remove = ["cookie"] }, rate_limit = "20/s burst 40 per user", affinity = "user", ip = { deny = ["127.0.0.2"] }, max_body_bytes = 65536, max_in_flight = 64 }]
"#;

const ISSUERS: &str = r#"
name = "shop"
[[gateway.jwt]]
name = "shop"
issuer = "shop-accounts"
audiences = ["shop"]
jwks = "accounts:/.well-known/jwks.json"
[[gateway.jwt]]
name = "staff"
issuer = "https://id.corp.example/realms/staff"
audiences = ["shop-admin"]
jwks = "https://id.corp.example/realms/staff/protocol/openid-connect/certs"
forward_claims = ["email"]
cookie = "staff_at"
[services.accounts]
run = { cargo = "shop-accounts" }
routes = [
  { path = "/api/accounts/me", auth = "jwt" },
  { path = "/admin/accounts/**", auth = "jwt", issuers = ["staff"] },
  { path = "/api/accounts/help", auth = "optional", issuers = ["staff", "shop", "staff"] },
  { path = "/api/accounts/open", methods = ["GET"] },
]
"#;

#[test]
fn several_jwt_issuers_parse_and_routes_name_them() {
    let m = parses(ISSUERS);
    let names: Vec<&str> = m.gateway.jwt.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["shop", "staff"]);
    assert_eq!(m.gateway.jwt[1].audiences, ["shop-admin"]);
    assert_eq!(m.gateway.jwt[1].forward_claims, ["email"]);
    assert_eq!(m.gateway.jwt[1].cookie.as_deref(), Some("staff_at"));
    // Claim names are case-sensitive: kept as written, not lowered.
    let m = parses(&ISSUERS.replacen(
        "forward_claims = [\"email\"]",
        "forward_claims = [\"tenantId\", \"Email_Verified\"]",
        1,
    ));
    assert_eq!(
        m.gateway.jwt[1].forward_claims,
        ["tenantId", "Email_Verified"]
    );
    assert_eq!(m.gateway.jwt[0].cookie, None);
    let issuers: Vec<&[String]> = m.services["accounts"]
        .routes
        .iter()
        .map(|r| r.issuers.as_slice())
        .collect();
    // None named: the first's; a name written twice counts once.
    assert_eq!(
        issuers,
        [
            &[][..],
            &["staff".to_string()][..],
            &["staff".to_string(), "shop".to_string()][..],
            &[][..]
        ]
    );
    // A lone table may leave its name out.
    let one = parses(&EDGE.replacen("jwt = { issuer", "jwt = { name = \"own\", issuer", 1));
    assert_eq!(one.gateway.jwt[0].name, "own");
    assert_eq!(parses(EDGE).gateway.jwt[0].name, "default");
    // The docs' example, with the service its first issuer's keys come from.
    let documented = documented_examples("#### Several issuers");
    assert_eq!(documented.len(), 1, "{documented:?}");
    let m = parses(&format!(
        "name = \"x\"\n{}\n[services.accounts]\nrun = {{ cargo = \"a\" }}\n",
        documented[0]
    ));
    assert_eq!(m.gateway.jwt.len(), 2);
    assert_eq!(m.services["catalog"].routes[1].issuers, ["staff"]);
}

#[test]
fn a_jwks_file_is_found_beside_the_manifest_and_leeway_is_the_issuers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/jwks.json"), r#"{"keys": []}"#).unwrap();
    let file = dir.path().join("flotilla.toml");
    std::fs::write(
        &file,
        "name = \"x\"\n[gateway]\njwt = { issuer = \"i\", audiences = [\"a\"], jwks_file = \"keys/jwks.json\", leeway = \"90s\" }\n[services.a]\nrun = { cargo = \"a\" }\n",
    )
    .unwrap();
    let m = Manifest::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let jwt = &m.gateway.jwt[0];
    assert_eq!(
        jwt.jwks,
        crate::JwksSource::File(dir.path().join("keys/jwks.json"))
    );
    assert_eq!(jwt.leeway, Duration::from_secs(90));
    // Watched by `flotilla up`: a key taken out is a reload.
    assert_eq!(m.gateway_files(), [dir.path().join("keys/jwks.json")]);
    assert_eq!(parses(EDGE).gateway.jwt[0].leeway, Duration::from_secs(60));
}

#[test]
fn ip_lists_are_read_from_files_beside_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("lists")).unwrap();
    // Spamhaus' DROP format and a FireHOL netset's comments.
    std::fs::write(
        dir.path().join("lists/drop.txt"),
        "; Spamhaus DROP List\n1.10.16.0/20 ; SBL256894\n\n# FireHOL\n2001:db8::/32\n192.0.2.7\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("lists/office.txt"), "10.0.0.0/8 # office\n").unwrap();
    let file = dir.path().join("flotilla.toml");
    let manifest = |gateway_ip: &str, route_ip: &str| {
        format!(
            "name = \"x\"\n[gateway]\nip = {{ {gateway_ip} }}\n[services.a]\nrun = {{ cargo = \"a\" }}\nroutes = [{{ path = \"/admin/**\", ip = {{ {route_ip} }} }}]\n"
        )
    };
    std::fs::write(
        &file,
        manifest(
            "deny = [\"203.0.113.0/24\"], deny_file = \"lists/drop.txt\"",
            "allow_file = \"lists/office.txt\"",
        ),
    )
    .unwrap();
    let m = Manifest::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let deny: Vec<String> = m
        .gateway
        .ip
        .as_ref()
        .unwrap()
        .deny
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        deny,
        [
            "203.0.113.0/24",
            "1.10.16.0/20",
            "2001:db8::/32",
            "192.0.2.7/32"
        ]
    );
    let route = m.services["a"].routes[0].ip.as_ref().unwrap();
    assert_eq!(route.allow[0].to_string(), "10.0.0.0/8");
    assert_eq!(
        m.gateway_files(),
        [
            dir.path().join("lists/drop.txt"),
            dir.path().join("lists/office.txt")
        ]
    );

    // A bad line is told with its number; past five, counted.
    let bad: String = (1..=8).map(|i| format!("10.0.0.{i}/33\n")).collect();
    std::fs::write(
        dir.path().join("lists/bad.txt"),
        format!("10.1.0.0/16\n{bad}"),
    )
    .unwrap();
    std::fs::write(&file, manifest("deny_file = \"lists/bad.txt\"", "")).unwrap();
    let e = Manifest::load(&file).unwrap_err().to_string();
    assert!(e.contains("line 2: `10.0.0.1/33`"), "{e}");
    assert!(e.contains("line 6: `10.0.0.5/33` and 3 more"), "{e}");
    std::fs::write(&file, manifest("", "deny_file = \"lists/missing.txt\"")).unwrap();
    let e = Manifest::load(&file).unwrap_err().to_string();
    assert!(e.contains("cannot read `deny_file`"), "{e}");
    assert!(e.contains("missing.txt"), "{e}");
}

#[test]
fn several_jwt_issuers_errors_say_what_to_fix() {
    for (from, to, expected) in [
        (
            "name = \"staff\"",
            "name = \"shop\"",
            "two issuers are named `shop`",
        ),
        (
            "name = \"staff\"\n",
            "",
            "an issuer of `[[gateway.jwt]]` has no `name`",
        ),
        (
            "name = \"staff\"",
            "name = \"staff team\"",
            "`staff team` cannot be an issuer's name",
        ),
        (
            "issuer = \"https://id.corp.example/realms/staff\"",
            "issuer = \"shop-accounts\"",
            "issuers `shop` and `staff` both verify `iss = \"shop-accounts\"`",
        ),
        (
            "issuers = [\"staff\"] }",
            "issuers = [\"staf\"] }",
            "`staf` is not an issuer of `[gateway] jwt`",
        ),
        (
            "issuers = [\"staff\"] }",
            "issuers = [] }",
            "`issuers` is empty: no token could pass",
        ),
        (
            "methods = [\"GET\"] }",
            "methods = [\"GET\"], issuers = [\"staff\"] }",
            "`issuers` need `auth = \"jwt\"` or `\"optional\"`",
        ),
        (
            "forward_claims = [\"email\"]",
            "forward_claims = [\"Issuer\"]",
            "`Issuer` would be `x-flotilla-user-issuer`, which the gateway sets itself",
        ),
        (
            "forward_claims = [\"email\"]",
            "forward_claims = [\"tenant_id\", \"tenant-id\"]",
            "`tenant-id` and `tenant_id` would both be `x-flotilla-user-tenant-id`",
        ),
        (
            "forward_claims = [\"email\"]",
            "forward_claims = [\"tenantId\", \"tenantid\"]",
            "`tenantid` and `tenantId` would both be `x-flotilla-user-tenantid`",
        ),
        (
            "forward_claims = [\"email\"]",
            "forward_claim = [\"email\"]",
            "forward_claim",
        ),
        (
            "cookie = \"staff_at\"",
            "cookie = \"staff at\"",
            "`staff at` cannot be a cookie's name",
        ),
        (
            "cookie = \"staff_at\"",
            "leeway = \"10m\"",
            "`leeway` of `10m` would take tokens long expired",
        ),
        (
            "jwks = \"https://id.corp.example/realms/staff/protocol/openid-connect/certs\"",
            "jwks_file = \"staff-jwks.json\"",
            "staff-jwks.json` does not exist",
        ),
        (
            "jwks = \"https://id.corp.example/realms/staff/protocol/openid-connect/certs\"",
            "jwks = \"https://id.corp.example/certs\"\njwks_file = \"staff-jwks.json\"",
            "`jwks` and `jwks_file` both say where the keys are",
        ),
        (
            "jwks = \"https://id.corp.example/realms/staff/protocol/openid-connect/certs\"",
            "",
            "this issuer has no keys: `jwks` or `jwks_file` is missing",
        ),
    ] {
        assert!(ISSUERS.contains(from), "{from}");
        let e = errors(&ISSUERS.replacen(from, to, 1));
        assert!(e.contains(expected), "{from} -> {to}: {e}");
    }
    // The help names the issuers there are.
    let e = errors(&ISSUERS.replacen("[\"staff\"] }", "[\"staf\"] }", 1));
    assert!(e.contains("name one of `shop`, `staff`"), "{e}");
    // An unknown key in the array's second table is pointed at where it is.
    let e = errors(&ISSUERS.replacen("forward_claims =", "forward_claim =", 1));
    assert!(e.contains("flotilla.toml:13:"), "{e}");
    // Neither a table nor an array of them.
    let e = errors(&EDGE.replacen("jwt = {", "jwt = \"shop\" # {", 1));
    assert!(e.contains("an array of such tables"), "{e}");
}

#[test]
fn edge_policies_parse() {
    let m = Manifest::parse(EDGE, Path::new("flotilla.toml")).unwrap();
    let jwt = m.gateway.jwt.first().unwrap();
    assert_eq!(jwt.issuer, "shop-accounts");
    assert_eq!(
        jwt.jwks,
        crate::JwksSource::Service {
            service: "accounts".into(),
            path: "/.well-known/jwks.json".into()
        }
    );
    assert_eq!(jwt.forward_claims, ["email"]);
    let cors = m.gateway.cors.as_ref().unwrap();
    assert!(cors.credentials);
    assert_eq!(cors.max_age.as_secs(), 300);
    assert_eq!(
        m.gateway.ip.as_ref().unwrap().allow[1].to_string(),
        "::1/128"
    );
    assert!(m.gateway.ip.as_ref().unwrap().proxy_protocol);
    assert_eq!(
        m.gateway.rate_limits,
        crate::RateLimitStore::Redis {
            url: "redis://127.0.0.1:6379".into()
        }
    );
    let login = &m.services["accounts"].routes[0];
    let login_cors = login.cors.as_ref().unwrap();
    assert_eq!(login_cors.origins, ["https://id.example"]);
    assert_eq!(login_cors.headers, ["content-type"]);
    assert!(!login_cors.credentials);
    assert_eq!(
        login_cors.max_age.as_secs(),
        600,
        "the default, not the gateway's"
    );
    assert_eq!(
        m.gateway.response_headers,
        crate::HeaderChanges {
            set: vec![
                ("x-content-type-options".into(), "nosniff".into()),
                ("x-frame-options".into(), "DENY".into()),
            ],
            remove: vec!["x-powered-by".into()],
            add: Vec::new(),
        },
        "names in lower case, in name order"
    );
    let added = EDGE.replacen(
        "remove = [\"X-Powered-By\"]",
        "remove = [\"X-Powered-By\"], add = { Vary = \"Accept-Language\", link = \" </a>; rel=preload \" }",
        1,
    );
    let m2 = Manifest::parse(&added, Path::new("flotilla.toml")).unwrap();
    assert_eq!(
        m2.gateway.response_headers.add,
        [
            ("link".to_string(), "</a>; rel=preload".to_string()),
            ("vary".to_string(), "Accept-Language".to_string())
        ]
    );
    assert_eq!(m.gateway.request_headers, crate::HeaderChanges::default());
    let route = &m.services["orders"].routes[0];
    assert_eq!(
        route.request_headers,
        crate::HeaderChanges {
            set: vec![("x-api-version".into(), "2".into())],
            remove: vec!["cookie".into()],
            add: Vec::new(),
        }
    );
    assert_eq!(route.response_headers, crate::HeaderChanges::default());
    assert_eq!(
        route.cors, None,
        "a route without `cors` keeps the gateway's"
    );
    assert_eq!(
        route.auth,
        Auth::Jwt {
            scopes: vec!["orders:write".into()],
            claims: [
                ("email_verified", &["true"][..]),
                ("level", &["3"]),
                ("realm_access.roles", &["buyer"]),
                ("tier", &["gold", "silver"]),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|v| v.to_string()).collect()))
            .collect()
        }
    );
    assert_eq!(
        route
            .rate_limits
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["20/s burst 40 per user"]
    );
    let daily = EDGE.replacen(
        "rate_limit = \"20/s burst 40 per user\"",
        "rate_limit = [\"20/s burst 40 per user\", \"5000/d per user\", \"100/s per route\"]",
        1,
    );
    let m3 = Manifest::parse(&daily, Path::new("flotilla.toml")).unwrap();
    assert_eq!(
        m3.services["orders"].routes[0]
            .rate_limits
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [
            "20/s burst 40 per user",
            "5000/d per user",
            "100/s per route"
        ]
    );
    assert_eq!(route.affinity, Some(crate::Affinity::User));
    assert_eq!(login.affinity, None);
    assert_eq!(route.max_body_bytes, Some(65536));
    assert_eq!(route.max_in_flight, Some(64));
    assert_eq!(
        route.ip.as_ref().unwrap().deny[0].to_string(),
        "127.0.0.2/32"
    );
}

#[test]
fn edge_policy_errors() {
    let cases = [
        (
            "jwks = \"accounts:/.well-known/jwks.json\"",
            "jwks = \"acounts:/jwks\"",
            "`jwks` names service `acounts`",
        ),
        (
            "credentials = true",
            "credentials = true, origins = [\"*\"]",
            "duplicate key",
        ),
        (
            "origins = [\"http://localhost:8080\"]",
            "origins = [\"*\"]",
            "`*` cannot be combined with `credentials = true`",
        ),
        (
            "origins = [\"http://localhost:8080\"]",
            "origins = [\"localhost:8080\"]",
            "`localhost:8080` is not an origin",
        ),
        (
            "\"127.0.0.0/8\"",
            "\"127.0.0.0/33\"",
            "`127.0.0.0/33` is not an IP network",
        ),
        (
            "store = \"redis\"",
            "store = \"redys\"",
            "unknown store `redys`",
        ),
        (
            "\"5/m burst 10 per ip\"",
            "\"5/m burst 10 per user\"",
            "`per user` needs a verified user",
        ),
        (
            "\"20/s burst 40 per user\"",
            "\"20/w\"",
            "`w` is not a time unit",
        ),
        (
            "\"20/s burst 40 per user\"",
            "[\"20/s per user\", \"30/s burst 5 per user\"]",
            "`20/s per user` and `30/s burst 5 per user` count the same key over the same unit of time",
        ),
        (
            "\"20/s burst 40 per user\"",
            "[\"20/s per user\", \"5000/d per user\", \"1/h\", \"2/m\", \"3/s per route\"]",
            "a route takes 1 to 4 rate limits, not 5",
        ),
        (
            "\"20/s burst 40 per user\"",
            "[\"20/s per user\", 5]",
            "every rate limit in the list must be a string",
        ),
        (
            "\"20/s burst 40 per user\"",
            "[\"20/s per user\", \"20/x\"]",
            "`x` is not a time unit",
        ),
        (
            "affinity = \"user\"",
            "affinity = \"session\"",
            "`session` is not an affinity: use `ip`, `user`, `header:<name>` or `cookie:<name>`",
        ),
        (
            "affinity = \"user\"",
            "affinity = \"cookie:a b\"",
            "`a b` is not a valid cookie name",
        ),
        (
            "rate_limit = \"5/m burst 10 per ip\"",
            "rate_limit = \"5/m burst 10 per ip\", affinity = \"user\"",
            "`affinity = \"user\"` needs a verified user",
        ),
        (
            "max_body_bytes = 65536",
            "max_body_bytes = 0",
            "`max_body_bytes = 0` is out of range",
        ),
        (
            "max_in_flight = 64",
            "max_in_flight = 0",
            "`max_in_flight = 0` is out of range",
        ),
        (
            "max_in_flight = 64",
            "max_in_flight = \"lots\"",
            "invalid type",
        ),
        (
            "auth = \"jwt\", scopes",
            "auth = \"public\", scopes",
            "`scopes` need `auth = \"jwt\"`",
        ),
        (
            "origins = [\"https://id.example\"]",
            "origins = [\"https://id.example/login\"]",
            "`https://id.example/login` is not an origin",
        ),
        (
            "cors = { origins = [\"https://id.example\"]",
            "cors = { origins = [\"*\"], credentials = true",
            "`*` cannot be combined with `credentials = true`",
        ),
        (
            "\"X-Frame-Options\" = \"DENY\"",
            "\"Access-Control-Allow-Origin\" = \"*\"",
            "`access-control-allow-origin` cannot be changed here: CORS fields come from `cors`",
        ),
        (
            "remove = [\"X-Powered-By\"]",
            "remove = [\"x powered\"]",
            "`x powered` is not a header name",
        ),
        (
            "\"X-Frame-Options\" = \"DENY\"",
            "\"X-Frame-Options\" = \"DENY\\r\\nX-Evil: 1\"",
            "the value of `x-frame-options` has a character a header cannot carry",
        ),
        (
            "remove = [\"X-Powered-By\"]",
            "remove = [\"x-frame-options\"]",
            "`x-frame-options` is named twice",
        ),
        (
            "remove = [\"cookie\"]",
            "remove = [\"X-Forwarded-For\"]",
            "`x-forwarded-for` cannot be changed here: the gateway sets it from the client's connection",
        ),
        (
            "request_headers = { set = { \"x-api-version\" = \" 2 \" }, remove = [\"cookie\"] }",
            "request_headers = { }",
            "this table changes nothing",
        ),
        (
            "remove = [\"X-Powered-By\"]",
            "remove = [\"X-Powered-By\"], add = { \"x-frame-options\" = \"SAMEORIGIN\" }",
            "`x-frame-options` is named twice",
        ),
        (
            "remove = [\"X-Powered-By\"]",
            "add = { \"X-Request-Id\" = \"1\" }",
            "`x-request-id` cannot be changed here",
        ),
        (
            "\"X-Frame-Options\" = \"DENY\"",
            "\"Vary\" = \"Accept-Language\"",
            "`vary` can only be added to: the gateway adds to it for CORS and compression",
        ),
        (
            "remove = [\"X-Powered-By\"]",
            "remove = [\"vary\"]",
            "`vary` can only be added to",
        ),
        (
            "\"X-Frame-Options\" = \"DENY\"",
            "\"Content-Encoding\" = \"gzip\"",
            "`content-encoding` cannot be changed here: it says how the body is encoded",
        ),
        (
            "remove = [\"cookie\"]",
            "remove = [\"x_flotilla_user_id\"]",
            "`x_flotilla_user_id` cannot be changed here: only the gateway says who the caller is",
        ),
        (
            "remove = [\"cookie\"]",
            "remove = [\"traceparent\"]",
            "`traceparent` cannot be changed here: the gateway passes the request's trace on",
        ),
        (
            "request_headers = { set",
            "request_headers = { append",
            "unknown key `append`",
        ),
        (
            "auth = \"jwt\", scopes = [\"orders:write\"], ",
            "",
            "`claims` need `auth = \"jwt\"`",
        ),
        (
            "email_verified = true",
            "scope = \"orders:write\"",
            "`scope` is checked by `scopes`, not `claims`",
        ),
        (
            "tier = [\"gold\", \"silver\"]",
            "tier = []",
            "claim `tier` lists no value: no token could pass",
        ),
        (
            "level = 3",
            "level = 3.5",
            "claim `level` must be a string, a boolean, an integer or an array of them",
        ),
        (
            "tier = [\"gold\", \"silver\"]",
            "tier = [\"gold\", { a = 1 }]",
            "claim `tier` must be a string",
        ),
        (
            "claims = { tier = [\"gold\", \"silver\"], email_verified = true, \"realm_access.roles\" = \"buyer\", level = 3 }",
            "claims = \"admin\"",
            "invalid type: string \"admin\", expected a map",
        ),
    ];
    for (from, to, message) in cases {
        assert!(EDGE.contains(from), "{from}");
        let e = errors(&EDGE.replacen(from, to, 1));
        assert!(e.contains(message), "{to}: {e}");
        assert!(e.contains("--> flotilla.toml:"), "{e}");
    }
    let no_jwt = EDGE.replacen("jwt = {", "# jwt = {", 1);
    let e = errors(&no_jwt);
    assert!(e.contains("`auth = \"jwt\"` needs `[gateway.jwt]`"), "{e}");
}

#[test]
fn an_optional_route_verifies_tokens_but_requires_none() {
    let optional = EDGE.replacen(
        "auth = \"jwt\", scopes = [\"orders:write\"], claims = { tier = [\"gold\", \"silver\"], email_verified = true, \"realm_access.roles\" = \"buyer\", level = 3 },",
        "auth = \"optional\",",
        1,
    );
    assert_ne!(optional, EDGE);
    let m = Manifest::parse(&optional, Path::new("flotilla.toml")).unwrap();
    let route = &m.services["orders"].routes[0];
    assert_eq!(route.auth, Auth::Optional);
    // `per user` is allowed: by user when there is one, by address when not.
    assert_eq!(
        route.rate_limits.first().map(|r| &r.key),
        Some(&crate::RateLimitKey::User)
    );
    let with_scopes = optional.replacen(
        "auth = \"optional\",",
        "auth = \"optional\", scopes = [\"a\"],",
        1,
    );
    assert!(errors(&with_scopes).contains("`scopes` need `auth = \"jwt\"`"));
    let no_jwt = optional.replacen("jwt = {", "# jwt = {", 1);
    assert!(errors(&no_jwt).contains("`auth = \"optional\"` needs `[gateway.jwt]`"));
    let typo = optional.replacen("auth = \"optional\"", "auth = \"optinal\"", 1);
    assert!(errors(&typo).contains("`auth = \"optional\"`"));
}

#[test]
fn gateway_tls_files_resolve_beside_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::write(dir.path().join("certs/gw.pem"), "cert").unwrap();
    std::fs::write(dir.path().join("certs/gw-key.pem"), "key").unwrap();
    let file = dir.path().join("flotilla.toml");
    std::fs::write(
        &file,
        "name = \"x\"\n[gateway.tls]\ncert = \"certs/gw.pem\"\nkey = \"certs/gw-key.pem\"\nmin_version = \"1.3\"\nhttp_redirect = \"127.0.0.1:8081\"\nhsts = \"365d\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    )
    .unwrap();
    let m = Manifest::load(&file).unwrap();
    let tls = m.gateway.tls.unwrap();
    assert_eq!(tls.cert, dir.path().join("certs/gw.pem"));
    assert_eq!(tls.key, dir.path().join("certs/gw-key.pem"));
    assert_eq!(tls.min_version, crate::TlsVersion::Tls13);
    assert_eq!(tls.http_redirect, "127.0.0.1:8081".parse().ok());
    assert_eq!(
        tls.hsts,
        Some(std::time::Duration::from_secs(365 * 24 * 3600))
    );

    std::fs::write(
        &file,
        "name = \"x\"\n[gateway.tls]\ncert = \"certs/gw.pem\"\nkey = \"certs/gw-key.pem\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    )
    .unwrap();
    let m = Manifest::load(&file).unwrap();
    assert_eq!(
        m.gateway.tls.map(|t| t.min_version),
        Some(crate::TlsVersion::Tls12),
        "TLS 1.2 is accepted unless the manifest says otherwise"
    );
}

#[test]
fn an_https_jwks_may_name_the_ca_it_chains_to_beside_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("idp-ca.pem"), "pem").unwrap();
    let file = dir.path().join("flotilla.toml");
    let jwt = |jwks: &str, ca: &str| {
        format!(
            "name = \"x\"\n[gateway]\njwt = {{ issuer = \"i\", audiences = [\"a\"], jwks = \"{jwks}\"{ca} }}\n[services.accounts]\nrun = {{ cargo = \"a\" }}\n"
        )
    };
    let https = "https://idp.example/.well-known/jwks.json";
    std::fs::write(&file, jwt(https, ", jwks_ca = \"idp-ca.pem\"")).unwrap();
    let m = Manifest::load(&file).unwrap();
    // Watched by `flotilla up`: a renewed CA is a reload.
    assert_eq!(m.gateway_files(), [dir.path().join("idp-ca.pem")]);
    let j = m.gateway.jwt.into_iter().next().unwrap();
    assert_eq!(j.jwks, crate::JwksSource::Url(https.into()));
    assert_eq!(j.jwks_ca, Some(dir.path().join("idp-ca.pem")));
    // Without one, the machine's roots (`None`).
    std::fs::write(&file, jwt(https, "")).unwrap();
    assert_eq!(
        Manifest::load(&file)
            .unwrap()
            .gateway
            .jwt
            .into_iter()
            .next()
            .unwrap()
            .jwks_ca,
        None
    );

    for (jwks, ca, says) in [
        (https, ", jwks_ca = \"missing.pem\"", "JWKS CA file"),
        (
            "accounts:/.well-known/jwks.json",
            ", jwks_ca = \"idp-ca.pem\"",
            "`jwks_ca` is for an `https://` `jwks` URL",
        ),
        (
            "http://127.0.0.1:9/jwks",
            ", jwks_ca = \"idp-ca.pem\"",
            "`jwks_ca` is for an `https://` `jwks` URL",
        ),
        (
            "http://idp.example/jwks",
            "",
            "write `https://idp.example/jwks`",
        ),
    ] {
        std::fs::write(&file, jwt(jwks, ca)).unwrap();
        let e = Manifest::load(&file).unwrap_err().to_string();
        assert!(e.contains(says), "{jwks} {ca}: {e}");
    }
}

/// The `[gateway] jwt` examples parse as printed: a service's JWKS, an
/// identity provider's over HTTPS, and one with its CA beside the manifest.
#[test]
fn the_documented_jwt_examples_parse() {
    let examples = documented_examples("### `[gateway] jwt`");
    assert_eq!(examples.len(), 3, "{examples:?}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::write(dir.path().join("certs/corp-ca.pem"), "pem").unwrap();
    let file = dir.path().join("flotilla.toml");
    let mut sources = Vec::new();
    for example in &examples {
        std::fs::write(
            &file,
            format!("name = \"x\"\n[gateway]\n{example}\n[services.accounts]\nrun = {{ cargo = \"a\" }}\n"),
        )
        .unwrap();
        let m = Manifest::load(&file).unwrap_or_else(|e| panic!("{e}\n{example}"));
        let jwt = m.gateway.jwt.into_iter().next().unwrap();
        sources.push((jwt.jwks, jwt.jwks_ca));
    }
    assert!(matches!(&sources[1], (crate::JwksSource::Url(u), None) if u.starts_with("https://")));
    assert_eq!(sources[2].1, Some(dir.path().join("certs/corp-ca.pem")));
    let cookie = documented_examples("#### Tokens in a cookie");
    assert_eq!(cookie.len(), 1, "{cookie:?}");
    let m = parses(&format!(
        "name = \"x\"\n[gateway]\n{}\n[services.accounts]\nrun = {{ cargo = \"a\" }}\n",
        cookie[0]
    ));
    assert_eq!(m.gateway.jwt[0].cookie.as_deref(), Some("access_token"));
}

#[test]
fn gateway_tls_further_certificates_resolve_beside_the_manifest_in_order() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "gw.pem",
        "gw-key.pem",
        "api.pem",
        "api-key.pem",
        "ec.pem",
        "ec-key.pem",
    ] {
        std::fs::write(dir.path().join(name), "pem").unwrap();
    }
    let file = dir.path().join("flotilla.toml");
    std::fs::write(
        &file,
        "name = \"x\"\n[gateway.tls]\ncert = \"gw.pem\"\nkey = \"gw-key.pem\"\n[[gateway.tls.certificates]]\ncert = \"api.pem\"\nkey = \"api-key.pem\"\n[[gateway.tls.certificates]]\ncert = \"ec.pem\"\nkey = \"ec-key.pem\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    )
    .unwrap();
    let m = Manifest::load(&file).unwrap();
    let tls = m.gateway.tls.unwrap();
    assert_eq!(tls.cert, dir.path().join("gw.pem"));
    assert_eq!(
        tls.certificates,
        vec![
            crate::TlsCertificate {
                cert: dir.path().join("api.pem"),
                key: dir.path().join("api-key.pem"),
            },
            crate::TlsCertificate {
                cert: dir.path().join("ec.pem"),
                key: dir.path().join("ec-key.pem"),
            },
        ]
    );
}

#[test]
fn gateway_tls_further_certificates_must_exist_and_be_listed_once() {
    // Cargo.toml and src/lib.rs: files that exist (tests run in the
    // crate's directory).
    let e = errors(
        "name = \"x\"\n[gateway.tls]\ncert = \"Cargo.toml\"\nkey = \"Cargo.toml\"\n[[gateway.tls.certificates]]\ncert = \"no-such-api.pem\"\nkey = \"src/lib.rs\"\n[[gateway.tls.certificates]]\ncert = \"Cargo.toml\"\nkey = \"src/lib.rs\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    );
    assert!(
        e.contains("certificate file `") && e.contains("no-such-api.pem` does not exist"),
        "{e}"
    );
    assert!(
        e.contains("certificate `Cargo.toml` is listed twice"),
        "{e}"
    );
    let e = errors(
        "name = \"x\"\n[gateway.tls]\ncert = \"Cargo.toml\"\nkey = \"Cargo.toml\"\n[[gateway.tls.certificates]]\ncert = \"src/lib.rs\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    );
    assert!(e.contains("missing key `key`"), "{e}");
}

#[test]
fn gateway_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["gw.pem", "gw-key.pem", "ca.pem", "crl.pem"] {
        std::fs::write(dir.path().join(name), "pem").unwrap();
    }
    let file = dir.path().join("flotilla.toml");
    std::fs::write(
        &file,
        "name = \"x\"\n[gateway.tls]\ncert = \"gw.pem\"\nkey = \"gw-key.pem\"\nclient_ca = \"ca.pem\"\nclient_crl = \"crl.pem\"\nclient_auth = \"required\"\n[services.a]\nrun = { cargo = \"a\" }\nroutes = [{ path = \"/partner/**\", client_cert = true }, { path = \"/api/**\" }]\n",
    )
    .unwrap();
    let m = Manifest::load(&file).unwrap();
    let tls = m.gateway.tls.as_ref().unwrap();
    assert_eq!(tls.client_ca, Some(dir.path().join("ca.pem")));
    assert_eq!(tls.client_crl, Some(dir.path().join("crl.pem")));
    assert_eq!(tls.client_auth, crate::ClientAuth::Required);
    let routes: Vec<bool> = m.routes().map(|(_, r)| r.client_cert).collect();
    assert_eq!(routes, [true, false]);

    // client_auth defaults to optional.
    std::fs::write(
        &file,
        "name = \"x\"\n[gateway.tls]\ncert = \"gw.pem\"\nkey = \"gw-key.pem\"\nclient_ca = \"ca.pem\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    )
    .unwrap();
    let m = Manifest::load(&file).unwrap();
    assert_eq!(
        m.gateway.tls.map(|t| t.client_auth),
        Some(crate::ClientAuth::Optional)
    );
}

#[test]
fn gateway_client_certificates_need_a_client_ca() {
    let e = errors(
        "name = \"x\"\n[services.a]\nrun = { cargo = \"a\" }\nroutes = [{ path = \"/partner/**\", client_cert = true }]\n",
    );
    assert!(
        e.contains("`client_cert = true` needs `[gateway.tls] client_ca`"),
        "{e}"
    );
    let e = errors(
        "name = \"x\"\n[gateway.tls]\ncert = \"Cargo.toml\"\nkey = \"Cargo.toml\"\nclient_auth = \"required\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    );
    assert!(e.contains("`client_auth` needs `client_ca`"), "{e}");
    let e = errors(
        "name = \"x\"\n[gateway.tls]\ncert = \"Cargo.toml\"\nkey = \"Cargo.toml\"\nclient_crl = \"Cargo.toml\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    );
    assert!(e.contains("`client_crl` needs `client_ca`"), "{e}");
    let e = errors(
        "name = \"x\"\n[gateway.tls]\ncert = \"Cargo.toml\"\nkey = \"Cargo.toml\"\nclient_ca = \"no-such-ca.pem\"\nclient_auth = \"sometimes\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    );
    assert!(
        e.contains("client CA file `") && e.contains("no-such-ca.pem` does not exist"),
        "{e}"
    );
    assert!(e.contains("unknown client_auth `sometimes`"), "{e}");
}

#[test]
fn gateway_tls_missing_files_and_bad_version() {
    let e = errors(
        "name = \"x\"\n[gateway.tls]\ncert = \"no-such.pem\"\nkey = \"no-such-key.pem\"\nmin_version = \"1.1\"\nhttp_redirect = \"port 80\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    );
    assert!(
        e.contains("certificate file `") && e.contains("no-such.pem` does not exist"),
        "{e}"
    );
    assert!(
        e.contains("key file `") && e.contains("no-such-key.pem` does not exist"),
        "{e}"
    );
    assert!(e.contains("`1.1` is not a TLS version"), "{e}");
    assert!(e.contains("min_version = \"1.2\""), "{e}");
    assert!(e.contains("`port 80` is not a socket address"), "{e}");
    // Cargo.toml: any file that exists (tests run in the crate's directory).
    let e = errors(
        "name = \"x\"\n[gateway]\nlisten = \"127.0.0.1:8443\"\n[gateway.tls]\ncert = \"Cargo.toml\"\nkey = \"Cargo.toml\"\nhttp_redirect = \"0.0.0.0:8443\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    );
    assert!(
        e.contains("`http_redirect` takes `listen`'s own port"),
        "{e}"
    );
    // The same check for a `listen` given in the manifest's place
    // (`flotilla up --listen`).
    let m = parses(
        "name = \"x\"\n[gateway]\nlisten = \"127.0.0.1:9443\"\n[gateway.tls]\ncert = \"Cargo.toml\"\nkey = \"Cargo.toml\"\nhttp_redirect = \"0.0.0.0:8443\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    );
    let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    assert_eq!(
        m.gateway.redirect_clashes_with(at("127.0.0.1:8443")),
        Some(at("0.0.0.0:8443"))
    );
    assert_eq!(m.gateway.redirect_clashes_with(at("127.0.0.1:8444")), None);
    assert_eq!(m.gateway.redirect_clashes_with(at("127.0.0.1:0")), None);
    let e = errors(
        "name = \"x\"\n[gateway.tls]\ncert = \"a.pem\"\n[services.a]\nrun = { cargo = \"a\" }\n",
    );
    assert!(e.contains("key"), "a missing `key` is named: {e}");
}

const TUNED: &str = r#"
name = "x"
[gateway.limits]
max_in_flight = 2000
max_connections = 5000
max_connections_per_ip = 64
max_connection_requests = 1000
max_connection_age = "10m"
max_body_bytes = 262144
max_header_bytes = 16384
max_headers = 50
header_timeout = "5s"
idle_timeout = "30s"
body_timeout = "20s"
connect_timeout = "500ms"
max_websockets = 300
websocket_idle_timeout = "1m"
workers = 2
[gateway.retries]
attempts = 1
budget_percent = 10
min_per_second = 5
[gateway.outlier_detection]
consecutive_failures = 3
base_ejection = "10s"
max_ejection = "2m"
[services.a]
run = { cargo = "a" }
"#;

#[test]
fn gateway_limits_retries_and_outlier_detection_parse() {
    let m = Manifest::parse(TUNED, Path::new("flotilla.toml")).unwrap();
    let secs = |s: u64| Some(std::time::Duration::from_secs(s));
    assert_eq!(
        m.gateway.limits,
        crate::GatewayLimits {
            max_in_flight: Some(2000),
            max_connections: Some(5000),
            max_connections_per_ip: Some(64),
            max_connection_requests: Some(1000),
            max_connection_age: secs(600),
            max_body_bytes: Some(262_144),
            max_header_bytes: Some(16384),
            max_headers: Some(50),
            header_timeout: secs(5),
            idle_timeout: secs(30),
            body_timeout: secs(20),
            connect_timeout: Some(std::time::Duration::from_millis(500)),
            max_websockets: Some(300),
            websocket_idle_timeout: secs(60),
            workers: Some(2),
        }
    );
    assert_eq!(
        m.gateway.retries,
        crate::Retries {
            attempts: Some(1),
            budget_percent: Some(10),
            min_per_second: Some(5),
        }
    );
    assert_eq!(
        m.gateway.outlier_detection,
        crate::OutlierDetection {
            consecutive_failures: Some(3),
            base_ejection: secs(10),
            max_ejection: secs(120),
        }
    );
    // Unset, every one is the gateway's default.
    let plain = Manifest::parse(
        "name = \"x\"\n[services.a]\nrun = { cargo = \"a\" }\n",
        Path::new("flotilla.toml"),
    )
    .unwrap();
    assert_eq!(plain.gateway.limits, crate::GatewayLimits::default());
    assert_eq!(plain.gateway.retries, crate::Retries::default());
    assert_eq!(
        plain.gateway.outlier_detection,
        crate::OutlierDetection::default()
    );
}

#[test]
fn gateway_limit_errors_name_the_key_and_the_range() {
    let cases = [
        (
            "max_in_flight = 2000",
            "max_in_flight = 0",
            "`max_in_flight = 0` is out of range",
        ),
        (
            "max_connections_per_ip = 64",
            "max_connections_per_ip = 0",
            "`max_connections_per_ip = 0` is out of range",
        ),
        (
            "max_connection_requests = 1000",
            "max_connection_requests = 0",
            "`max_connection_requests = 0` is out of range",
        ),
        (
            "max_connection_requests = 1000",
            "max_connection_requests = 10000001",
            "use a whole number from 1 to 10000000",
        ),
        (
            "max_connection_age = \"10m\"",
            "max_connection_age = \"500ms\"",
            "`max_connection_age = \"500ms\"` is out of range",
        ),
        (
            "max_connection_age = \"10m\"",
            "max_connection_age = \"2d\"",
            "use a duration from 1s to 1day",
        ),
        (
            "max_header_bytes = 16384",
            "max_header_bytes = 4096",
            "use a whole number from 8192 to 1048576",
        ),
        (
            "max_body_bytes = 262144",
            "max_body_bytes = 0",
            "`max_body_bytes = 0` is out of range",
        ),
        (
            "header_timeout = \"5s\"",
            "header_timeout = \"10h\"",
            "`header_timeout = \"10h\"` is out of range",
        ),
        (
            "connect_timeout = \"500ms\"",
            "connect_timeout = \"5ms\"",
            "use a duration from 100ms to 1m",
        ),
        (
            "idle_timeout = \"30s\"",
            "idle_timeout = \"soon\"",
            "`soon` is not a duration",
        ),
        (
            "workers = 2",
            "workers = 5000",
            "`workers = 5000` is out of range",
        ),
        (
            "budget_percent = 10",
            "budget_percent = 120",
            "`budget_percent = 120` is out of range",
        ),
        (
            "attempts = 1",
            "retries = 1",
            "the keys allowed here are `attempts`, `budget_percent`, `min_per_second`",
        ),
        (
            "max_in_flight = 2000",
            "max_inflight = 2000",
            "did you mean `max_in_flight`",
        ),
        (
            "max_ejection = \"2m\"",
            "max_ejection = \"5s\"",
            "`max_ejection` (5s) is shorter than `base_ejection` (10s)",
        ),
        (
            "base_ejection = \"10s\"\nmax_ejection = \"2m\"",
            "base_ejection = \"10m\"",
            "`max_ejection` (5m) is shorter than `base_ejection` (10m)",
        ),
        (
            "consecutive_failures = 3",
            "consecutive_failures = 0",
            "`consecutive_failures = 0` is out of range",
        ),
    ];
    for (from, to, message) in cases {
        assert!(TUNED.contains(from), "{from}");
        let e = errors(&TUNED.replacen(from, to, 1));
        assert!(e.contains(message), "{to}: {e}");
        assert!(e.contains("--> flotilla.toml:"), "{e}");
    }
}

/// The TOML blocks of the docs/manifest.md section under `heading`.
fn documented_examples(heading: &str) -> Vec<String> {
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/manifest.md"),
    )
    .unwrap_or_else(|e| panic!("docs/manifest.md: {e}"));
    let section = docs
        .split(&format!("\n{heading}"))
        .nth(1)
        .unwrap_or_else(|| panic!("docs/manifest.md has no `{heading}`"));
    // Up to the next heading (the document's only `# ` is its title; a
    // TOML comment at a line's start is `# `, never `##`).
    let section = section.split("\n##").next().unwrap_or_default();
    // A block in a list item is indented; TOML is not, to its parser.
    section
        .split("```toml\n")
        .skip(1)
        .map(|block| {
            block
                .lines()
                .take_while(|line| line.trim() != "```")
                .map(str::trim_start)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

fn parses(src: &str) -> Manifest {
    Manifest::parse(src, Path::new("flotilla.toml"))
        .unwrap_or_else(|e| panic!("does not parse: {e}\n{src}"))
}

/// The gateway examples docs/manifest.md gives parse as printed, wrapped in
/// what each leaves out (a name, a service, a JWT issuer).
#[test]
fn the_documented_gateway_examples_parse() {
    let service = "[services.a]\nrun = { cargo = \"a\" }\n";

    let headers = documented_examples("### Header changes");
    let m = parses(&format!("name = \"x\"\n{}", headers[0]));
    assert_eq!(m.gateway.response_headers.set.len(), 3);
    assert_eq!(m.gateway.response_headers.remove, ["x-powered-by"]);
    let catalog = &m.services["catalog"].routes[0];
    assert_eq!(catalog.request_headers.remove, ["cookie"]);
    assert_eq!(catalog.response_headers.set[0].0, "cache-control");
    assert_eq!(
        catalog.response_headers.add[0],
        ("vary".into(), "Accept-Language".into())
    );

    let compression = documented_examples("### `[gateway] compression`");
    let m = parses(&format!("name = \"x\"\n{}\n{service}", compression[0]));
    assert_eq!(m.gateway.compression.map(|c| c.level), Some(5));
    let m = parses(&format!("name = \"x\"\n{}", compression[1]));
    assert!(!m.services["accounts"].routes[0].compress);

    let limits = documented_examples("### `[gateway] limits`, `retries`, `outlier_detection`");
    let m = parses(&format!("name = \"x\"\n{}\n{service}", limits[0]));
    assert_eq!(m.gateway.limits.max_in_flight, Some(2000));
    assert_eq!(
        m.gateway.limits.header_timeout,
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        m.gateway.limits.max_connection_age,
        Some(Duration::from_secs(600))
    );
    assert_eq!(m.gateway.retries.attempts, Some(1));
    assert_eq!(
        m.gateway.outlier_detection.base_ejection,
        Some(Duration::from_secs(10))
    );

    let jwt = "[gateway]\njwt = { issuer = \"i\", audiences = [\"a\"], jwks = \"http://127.0.0.1:1/jwks.json\" }\n";
    let claims = documented_examples("#### Required claims");
    let m = parses(&format!("name = \"x\"\n{jwt}{service}{}", claims[0]));
    let Auth::Jwt { claims, .. } = &m.services["a"].routes[0].auth else {
        panic!("the first claims route is not a JWT route");
    };
    assert_eq!(claims["realm_access.roles"], ["shop-admin", "ops"]);

    let ip = documented_examples("### `[gateway] ip` (and a route's `ip`)");
    assert_eq!(ip.len(), 3, "{ip:?}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("blocklists")).unwrap();
    std::fs::write(
        dir.path().join("blocklists/drop.txt"),
        "1.10.16.0/20 ; SBL256894\n",
    )
    .unwrap();
    let file = dir.path().join("flotilla.toml");
    std::fs::write(
        &file,
        format!("name = \"x\"\n[gateway]\n{}\n{service}", ip[1]),
    )
    .unwrap();
    let m = Manifest::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.gateway.ip.as_ref().unwrap().deny.len(), 2);
    let m = parses(&format!("name = \"x\"\n{}\n{service}", ip[2]));
    let ip = m.gateway.ip.as_ref().unwrap();
    assert!(ip.proxy_protocol);
    assert_eq!(ip.trusted_proxies[0].to_string(), "10.0.0.0/24");

    let hosts = documented_examples("#### Hosts");
    let m = parses(&format!("name = \"x\"\n{}", hosts[0]));
    let api: Vec<String> = m.services["api"].routes[0]
        .hosts
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(api, ["api.example.com", "*.api.example.com"]);
    assert!(m.services["api"].routes[1].hosts.is_empty());

    let strip = documented_examples("#### Stripping a prefix");
    let m = parses(&format!("name = \"x\"\n{}", strip[0]));
    let forwarded: Vec<String> = m.services["legacy"]
        .routes
        .iter()
        .map(|r| r.forwarded_pattern().as_str().to_string())
        .collect();
    assert_eq!(forwarded, ["/**", "/orders/**"]);

    let split = documented_examples("#### Splitting traffic (canary releases)");
    let m = parses(&format!("name = \"x\"\n{}", split[0]));
    assert_eq!(m.services["catalog"].routes[0].split["catalog-v2"], 5);
    assert_eq!(m.routes_reaching("catalog-v2").count(), 1);

    let several = documented_examples("#### Several rate limits");
    let m = parses(&format!(
        "name = \"x\"\n{jwt}[services.search]\nrun = {{ cargo = \"s\" }}\n{}",
        several[0]
    ));
    let limits: Vec<String> = m.services["search"].routes[0]
        .rate_limits
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        limits,
        [
            "10/s burst 20 per user",
            "2000/d per user",
            "300/s per route"
        ]
    );

    let sticky = documented_examples("#### Keeping a client on one instance (affinity)");
    let m = parses(&format!("name = \"x\"\n{}", sticky[0]));
    assert_eq!(
        m.services["cart"].routes[0].affinity,
        Some(crate::Affinity::Cookie("flotilla-cart".into()))
    );

    let mirror = documented_examples("#### Mirroring traffic (shadow requests)");
    let m = parses(&format!("name = \"x\"\n{}", mirror[0]));
    assert_eq!(m.services["catalog"].routes[0].mirror["catalog-v2"], 100);

    let cache = documented_examples("#### Caching responses");
    // Its writing route takes tokens: an issuer, as the shop has.
    let with_issuer = cache[0].replacen(
        "[gateway]\n",
        "[gateway]\njwt = { issuer = \"i\", audiences = [\"a\"], jwks = \"http://127.0.0.1:1/jwks.json\" }\n",
        1,
    );
    let m = parses(&format!("name = \"x\"\n{with_issuer}"));
    assert_eq!(m.gateway.cache.max_bytes, 128 << 20);
    assert_eq!(
        m.services["reviews"].routes[0]
            .cache
            .as_ref()
            .map(|c| (c.ttl, c.stale_if_error)),
        Some((Duration::from_secs(30), Duration::from_secs(3600)))
    );
    let m = parses(&format!("name = \"x\"\n{}", cache[1]));
    assert_eq!(
        m.services["catalog"].routes[0]
            .cache
            .as_ref()
            .and_then(|c| c.query.clone()),
        Some(vec!["limit".to_string(), "page".to_string()])
    );
    // The order of routes, after it: a canary for a header.
    let m = parses(&format!("name = \"x\"\n{}", cache[2]));
    assert_eq!(
        m.services["catalog-v2"].routes[0].match_headers["x-canary"],
        ["1"]
    );

    let keys = documented_examples("### `[gateway] api_keys`");
    let m = parses(&format!("name = \"x\"\n{}", keys[0]));
    assert_eq!(
        m.services["analytics"].routes[0].auth,
        Auth::Key {
            consumers: vec!["demo-partner".into()]
        }
    );
    assert_eq!(m.gateway.api_keys.map(|k| k.consumers.len()), Some(1));

    let authz = documented_examples("### `[gateway] authz`");
    let m = parses(&format!("name = \"x\"\n{}", authz[0]));
    assert!(m.services["orders"].routes[0].authz);
    assert_eq!(
        m.gateway
            .authz
            .map(|a| (a.service, a.path_prefix, a.upstream_headers)),
        Some(("policy".into(), "/check".into(), vec!["x-tenant-id".into()]))
    );

    let compression = documented_examples("### `[gateway] compression`");
    let m = parses(&format!("name = \"x\"\n{}\n{service}", compression[0]));
    let c = m.gateway.compression.unwrap_or_default();
    assert_eq!(c.types, ["application/json", "text/*"]);

    let cors = documented_examples("### `[gateway] cors`");
    let m = parses(&format!("name = \"x\"\n{service}{}", cors[1]));
    let route_cors = m.services["a"].routes[0].cors.as_ref();
    assert_eq!(route_cors.map(|c| c.origins.len()), Some(2));
}

#[test]
fn a_route_s_cache_and_the_store_take_defaults_and_refuse_what_cannot_be_kept() {
    let with = |gateway: &str, route: &str| {
        format!(
            "name = \"x\"\n{gateway}\n[services.a]\nrun = {{ cargo = \"a\" }}\nroutes = [{{ path = \"/a/**\", {route} }}]\n"
        )
    };
    let m = parses(&with("", "cache = {}"));
    assert_eq!(m.gateway.cache, crate::CacheStore::default());
    assert_eq!(
        m.services["a"].routes[0].cache,
        Some(crate::RouteCache {
            ttl: Duration::from_secs(60),
            stale_if_error: Duration::ZERO,
            stale_while_revalidate: Duration::ZERO,
            query: None,
        })
    );
    let m = parses(&with(
        "[gateway.cache]\nmax_bytes = 4096\nmax_entry_bytes = 4096",
        "methods = [\"GET\", \"POST\"], cache = { ttl = \"2m\", stale_if_error = \"1h\", stale_while_revalidate = \"5s\", query = [\"page\", \"filter[tag]\"] }",
    ));
    assert_eq!(
        m.services["a"].routes[0]
            .cache
            .as_ref()
            .and_then(|c| c.query.clone()),
        Some(vec!["page".to_string(), "filter[tag]".to_string()])
    );
    assert_eq!(
        (m.gateway.cache.max_bytes, m.gateway.cache.max_entry_bytes),
        (4096, 4096)
    );
    // The documented bounds, both ends: 1 KiB and 4 GiB.
    for bytes in [1024, 4 << 30] {
        let m = parses(&with(
            &format!("[gateway.cache]\nmax_bytes = {bytes}\nmax_entry_bytes = 1024"),
            "cache = {}",
        ));
        assert_eq!(m.gateway.cache.max_bytes, bytes);
    }
    assert_eq!(
        m.services["a"].routes[0].cache.as_ref().map(|c| (
            c.ttl,
            c.stale_if_error,
            c.stale_while_revalidate
        )),
        Some((
            Duration::from_secs(120),
            Duration::from_secs(3600),
            Duration::from_secs(5)
        ))
    );
    assert_eq!(
        parses(&with("", "methods = [\"GET\"]")).services["a"].routes[0].cache,
        None
    );

    for (route, want) in [
        (
            "methods = [\"POST\"], cache = {}",
            "`cache` keeps GET responses only, and this route takes no GET",
        ),
        (
            "cache = { ttl = \"500ms\" }",
            "`ttl = \"500ms\"` is out of range",
        ),
        (
            "cache = { ttl = \"400d\" }",
            "`ttl = \"400d\"` is out of range",
        ),
        ("cache = { ttl = \"0s\" }", "`ttl` must be longer than zero"),
        ("cache = { ttl = \"soon\" }", "`soon` is not a duration"),
        (
            "cache = { stale_if_error = \"400d\" }",
            "`stale_if_error = \"400d\"` is out of range",
        ),
        (
            "cache = { stale_while_revalidate = \"-1s\" }",
            "`-1s` is not a duration",
        ),
        ("cache = { ttl = \"1m\", vary = [] }", "unknown key `vary`"),
        (
            "cache = { query = [\"\"] }",
            "`` is not a query parameter's name",
        ),
        (
            "cache = { query = [\"a&b\"] }",
            "`a&b` is not a query parameter's name",
        ),
        (
            "cache = { query = [\"page\", \"page\"] }",
            "`page` is listed twice in `query`",
        ),
        ("cache = { query = \"page\" }", "invalid type"),
    ] {
        let e = errors(&with("", route));
        assert!(e.contains(want), "{route}: {e}");
        assert!(e.contains("flotilla.toml:5:"), "{route}: {e}");
    }
    for (gateway, want) in [
        ("max_bytes = 100", "`max_bytes = 100` is out of range"),
        (
            "max_bytes = 4294967297",
            "use a whole number from 1024 (1 KiB) to 4294967296 (4 GiB)",
        ),
        ("max_bytes = -1", "`max_bytes = -1` is out of range"),
        (
            "max_entry_bytes = 0",
            "`max_entry_bytes = 0` is out of range",
        ),
        (
            "max_bytes = 2048\nmax_entry_bytes = 4096",
            "`max_entry_bytes = 4096` is more than the whole cache (`max_bytes = 2048`)",
        ),
        ("size = 1", "unknown key `size`"),
    ] {
        let e = errors(&with(&format!("[gateway.cache]\n{gateway}"), "cache = {}"));
        assert!(e.contains(want), "{gateway}: {e}");
    }
}

#[test]
fn a_route_may_be_for_requests_with_given_headers() {
    let two = |first: &str, second: &str| {
        format!(
            "name = \"x\"\n[services.a]\nrun = {{ cargo = \"a\" }}\nroutes = [{{ path = \"/api/**\"{first} }}]\n[services.b]\nrun = {{ cargo = \"b\" }}\nroutes = [{{ path = \"/api/**\"{second} }}]\n"
        )
    };
    let m = parses(&two(
        "",
        ", match_headers = { \"X-Canary\" = \"1\", x-tier = [\"gold\", \"silver\"] }",
    ));
    assert!(m.services["a"].routes[0].match_headers.is_empty());
    let headers = &m.services["b"].routes[0].match_headers;
    assert_eq!(headers["x-canary"], ["1"]);
    assert_eq!(headers["x-tier"], ["gold", "silver"]);
    // The same path for the same headers is one route declared twice.
    let same = ", match_headers = { x-canary = \"1\" }";
    let e = errors(&two(same, ", match_headers = { X-CANARY = \"1\" }"));
    assert!(e.contains("is also declared by service `a`"), "{e}");
    parses(&two(same, ", match_headers = { x-canary = \"2\" }"));
    // Also written another way: a string is a list of one, and a list is
    // a set of values.
    let e = errors(&two(same, ", match_headers = { x-canary = [\"1\"] }"));
    assert!(e.contains("is also declared by service `a`"), "{e}");
    let e = errors(&two(
        ", match_headers = { x-tier = [\"gold\", \"silver\"] }",
        ", match_headers = { X-Tier = [\"silver\", \"gold\", \"gold\"] }",
    ));
    assert!(e.contains("is also declared by service `a`"), "{e}");
    parses(&two(
        same,
        ", match_headers = { x-canary = [\"1\", \"2\"] }",
    ));

    for (route, want) in [
        (
            ", match_headers = { \"x canary\" = \"1\" }",
            "`x canary` is not a header name",
        ),
        (
            ", match_headers = { x-flotilla-user-id = \"1\" }",
            "is set by the gateway, never by a client",
        ),
        (
            ", match_headers = { x-canary = [] }",
            "`x-canary` lists no value",
        ),
        (
            ", match_headers = { x-canary = 1 }",
            "`x-canary` must be a string or an array of strings",
        ),
        // One header in two spellings: the gateway would keep one value.
        (
            ", match_headers = { X-Canary = \"1\", x-canary = \"2\" }",
            "`x-canary` and `X-Canary` are the same header",
        ),
        (
            ", match_headers = { X-Canary = \"1\", x-canary = \"2\" }",
            "give `x-canary` once, with every value it may have in a list",
        ),
    ] {
        let e = errors(&two("", route));
        assert!(e.contains(want), "{route}: {e}");
    }
}

#[test]
fn api_keys_are_digests_of_named_consumers_and_key_routes_need_them() {
    let a = "sha256:".to_string() + &"ab".repeat(32);
    let b = "sha256:".to_string() + &"0F".repeat(32);
    let with = |keys: &str, route: &str| {
        format!(
            "name = \"x\"\n[gateway.api_keys]\n{keys}\n[services.a]\nrun = {{ cargo = \"a\" }}\nroutes = [{{ path = \"/a/**\", {route} }}]\n"
        )
    };
    let keys = format!("consumers = {{ partner-a = [\"{a}\"], partner-b = [\"{b}\"] }}");
    let m = parses(&with(
        &keys,
        "auth = \"key\", consumers = [\"partner-b\"], rate_limit = \"5/s per user\"",
    ));
    let api = m
        .gateway
        .api_keys
        .as_ref()
        .unwrap_or_else(|| panic!("api_keys"));
    assert_eq!(api.header, "x-api-key");
    assert_eq!(api.consumers["partner-a"], vec![[0xab; 32]]);
    assert_eq!(api.consumers["partner-b"], vec![[0x0f; 32]]);
    assert_eq!(
        m.services["a"].routes[0].auth,
        Auth::Key {
            consumers: vec!["partner-b".into()]
        }
    );
    let m = parses(&with(
        &format!("header = \"X-Partner-Key\"\n{keys}"),
        "auth = \"key\"",
    ));
    let api = m
        .gateway
        .api_keys
        .as_ref()
        .unwrap_or_else(|| panic!("api_keys"));
    assert_eq!(api.header, "x-partner-key");

    for (keys, route, want) in [
        (
            keys.clone(),
            "auth = \"key\", consumers = [\"partner-z\"]".to_string(),
            "`partner-z` is not a consumer of `[gateway.api_keys]`",
        ),
        (
            keys.clone(),
            "consumers = [\"partner-a\"]".to_string(),
            "`consumers` need `auth = \"key\"`",
        ),
        // Empty lists are no way around these: `[]` on a key route would
        // have admitted every consumer, and elsewhere passed unnoticed.
        (
            keys.clone(),
            "auth = \"key\", consumers = []".to_string(),
            "`consumers = []` names no consumer",
        ),
        (
            keys.clone(),
            "auth = \"key\", consumers = []".to_string(),
            "leave `consumers` out to admit every consumer of `[gateway.api_keys]`",
        ),
        (
            keys.clone(),
            "consumers = []".to_string(),
            "`consumers` need `auth = \"key\"`",
        ),
        (
            keys.clone(),
            "scopes = []".to_string(),
            "`scopes` need `auth = \"jwt\"`",
        ),
        (
            "consumers = { partner-a = [\"s3cr3t\"] }".to_string(),
            "auth = \"key\"".to_string(),
            "`s3cr3t` is not a key's digest",
        ),
        (
            format!("consumers = {{ partner-a = [\"{a}\"], partner-b = [\"{a}\"] }}"),
            "auth = \"key\"".to_string(),
            "this key is also `partner-a`'s",
        ),
        (
            "consumers = { partner-a = [] }".to_string(),
            "auth = \"key\"".to_string(),
            "consumer `partner-a` has no key",
        ),
        (
            format!("header = \"authorization\"\n{keys}"),
            "auth = \"key\"".to_string(),
            "`header = \"authorization\"` cannot carry API keys",
        ),
        (
            "consumers = {}".to_string(),
            "auth = \"key\"".to_string(),
            "names no consumer",
        ),
        (
            keys.clone(),
            "auth = \"key\", rate_limit = [\"5/s per user\", \"1000/d per header:x-api-key\"]"
                .to_string(),
            "`per header:x-api-key` cannot count by the API-key header: the gateway takes it off every request",
        ),
        // On any route: the key header never reaches the limits.
        (
            keys.clone(),
            "rate_limit = \"5/s per header:x-api-key\"".to_string(),
            "make the route `auth = \"key\"` and count `per user`, or count `per ip`",
        ),
        (
            keys.clone(),
            "affinity = \"header:x-api-key\"".to_string(),
            "use `affinity = \"ip\"`",
        ),
        (
            format!("header = \"X-Partner-Key\"\n{keys}"),
            "auth = \"key\", rate_limit = \"5/s per header:X-Partner-Key\"".to_string(),
            "count `per user`",
        ),
        (
            keys.clone(),
            "auth = \"key\", affinity = \"header:x-api-key\"".to_string(),
            "use `affinity = \"user\"`",
        ),
    ] {
        let e = errors(&with(&keys, &route));
        assert!(e.contains(want), "{keys} / {route}: {e}");
    }
    // Another header is the client's to count.
    parses(&with(&keys, "rate_limit = \"5/s per header:x-tenant\""));
    let e = errors(
        "name = \"x\"\n[services.a]\nrun = { cargo = \"a\" }\nroutes = [{ path = \"/a/**\", auth = \"key\" }]\n",
    );
    assert!(
        e.contains("`auth = \"key\"` needs `[gateway.api_keys]`"),
        "{e}"
    );
}

#[test]
fn the_proxy_protocol_needs_trusted_proxies_and_is_the_gateway_s_alone() {
    let e = errors(&with_service("[gateway]\nip = { proxy_protocol = true }"));
    assert!(
        e.contains("`proxy_protocol = true` needs `trusted_proxies`"),
        "{e}"
    );
    assert!(e.contains("trusted_proxies = [\"10.0.0.0/24\"]"), "{e}");
    let ok = Manifest::parse(
        &with_service(
            "[gateway]\nip = { trusted_proxies = [\"10.0.0.2\"], proxy_protocol = false }",
        ),
        Path::new("flotilla.toml"),
    );
    assert!(ok.is_ok_and(|m| m.gateway.ip.is_some_and(|ip| !ip.proxy_protocol)));
    for key in ["proxy_protocol = true", "trusted_proxies = [\"10.0.0.2\"]"] {
        let e = errors(&with_service(&format!(
            "routes = [{{ path = \"/a\", ip = {{ allow = [\"10.0.0.0/8\"], {key} }} }}]"
        )));
        let name = key.split(' ').next().unwrap_or_default();
        assert!(
            e.contains(&format!(
                "a route's `ip` takes `allow` and `deny` only, not `{name}`"
            )),
            "{e}"
        );
        assert!(e.contains("set it in `[gateway.ip]`"), "{e}");
    }
}

#[test]
fn the_forwarded_header_is_x_forwarded_for_unless_named_and_the_gateway_s_alone() {
    let ip_of = |ip: &str| {
        Manifest::parse(
            &with_service(&format!("[gateway]\nip = {{ {ip} }}")),
            Path::new("flotilla.toml"),
        )
        .map(|m| m.gateway.ip.map(|ip| ip.forwarded_header))
    };
    assert!(matches!(
        ip_of("trusted_proxies = [\"10.0.0.2\"]"),
        Ok(Some(ForwardedHeader::XForwardedFor))
    ));
    assert!(matches!(
        ip_of("trusted_proxies = [\"10.0.0.2\"], forwarded_header = \"Forwarded\""),
        Ok(Some(ForwardedHeader::Forwarded))
    ));
    assert!(matches!(
        ip_of("trusted_proxies = [\"10.0.0.2\"], forwarded_header = \"x-forwarded-for\""),
        Ok(Some(ForwardedHeader::XForwardedFor))
    ));
    let e = errors(&with_service(
        "[gateway]\nip = { trusted_proxies = [\"10.0.0.2\"], forwarded_header = \"x-real-ip\" }",
    ));
    assert!(e.contains("unknown forwarded_header `x-real-ip`"), "{e}");
    assert!(
        e.contains("`forwarded_header = \"x-forwarded-for\"` (the default)"),
        "{e}"
    );
    let e = errors(&with_service(
        "routes = [{ path = \"/a\", ip = { allow = [\"10.0.0.0/8\"], forwarded_header = \"forwarded\" } }]",
    ));
    assert!(
        e.contains("a route's `ip` takes `allow` and `deny` only, not `forwarded_header`"),
        "{e}"
    );
}

#[test]
fn authz_names_a_service_and_headers_and_routes_opt_in() {
    let with = |authz: &str, route: &str| {
        format!(
            "name = \"x\"\n[gateway.authz]\n{authz}\n[services.a]\nrun = {{ cargo = \"a\" }}\nroutes = [{{ path = \"/a/**\", {route} }}]\n[services.policy]\nrun = {{ cargo = \"p\" }}\n"
        )
    };
    let m = parses(&with("service = \"policy\"", "authz = true"));
    let authz = m.gateway.authz.clone().unwrap_or_else(|| panic!("authz"));
    assert_eq!(authz.service, "policy");
    assert_eq!(authz.path_prefix, "");
    assert_eq!(authz.timeout, crate::Authz::DEFAULT_TIMEOUT);
    assert_eq!(authz.request_headers, ["authorization", "cookie"]);
    assert!(authz.upstream_headers.is_empty() && !authz.failure_open);
    assert!(m.services["a"].routes[0].authz);
    let m = parses(&with(
        "service = \"policy\"\npath_prefix = \"/check/\"\ntimeout = \"250ms\"\nrequest_headers = [\"Authorization\", \"x-session\"]\nupstream_headers = [\"X-Tenant-Id\"]\nfailure = \"allow\"",
        "methods = [\"GET\"]",
    ));
    let authz = m.gateway.authz.clone().unwrap_or_else(|| panic!("authz"));
    assert_eq!(authz.path_prefix, "/check");
    assert_eq!(authz.timeout, Duration::from_millis(250));
    assert_eq!(authz.request_headers, ["authorization", "x-session"]);
    assert_eq!(authz.upstream_headers, ["x-tenant-id"]);
    assert!(authz.failure_open);
    assert!(!m.services["a"].routes[0].authz, "routes opt in");

    for (authz, route, want) in [
        (
            "service = \"nope\"",
            "",
            "`service = \"nope\"` is not a service of this system",
        ),
        (
            "service = \"policy\"\npath_prefix = \"check\"",
            "",
            "is not a path prefix",
        ),
        (
            "service = \"policy\"\npath_prefix = \"/a/../b\"",
            "",
            "is not a path prefix",
        ),
        (
            "service = \"policy\"\ntimeout = \"2m\"",
            "",
            "longer than a check may take",
        ),
        (
            "service = \"policy\"\nupstream_headers = [\"x-flotilla-user-id\"]",
            "",
            "`x-flotilla-user-id` cannot be listed here",
        ),
        (
            "service = \"policy\"\nupstream_headers = [\"host\"]",
            "",
            "`host` cannot be listed here",
        ),
        (
            "service = \"policy\"\nrequest_headers = [\"bad name\"]",
            "",
            "it is not a header name",
        ),
        (
            "service = \"policy\"\nrequest_headers = [\"transfer-encoding\"]",
            "",
            "`transfer-encoding` cannot be listed here",
        ),
        (
            "service = \"policy\"\nrequest_headers = [\"x-forwarded-for\"]",
            "",
            "`x-forwarded-for` cannot be listed here",
        ),
        (
            "service = \"policy\"\nrequest_headers = [\"x-flotilla-user-id\"]",
            "",
            "`x-flotilla-user-id` cannot be listed here",
        ),
        (
            "service = \"policy\"\nfailure = \"open\"",
            "",
            "is neither `deny` nor `allow`",
        ),
        ("service = \"policy\"\nretries = 2", "", "retries"),
    ] {
        let e = errors(&with(authz, route));
        assert!(e.contains(want), "{authz}: {e}");
    }
    // The API keys' header is taken off every request before the check.
    let keyed = format!(
        "name = \"x\"\n[gateway.api_keys]\nconsumers = {{ p = [\"sha256:{}\"] }}\n{}",
        "ab".repeat(32),
        &with(
            "service = \"policy\"\nrequest_headers = [\"X-Api-Key\"]",
            "authz = true"
        )["name = \"x\"\n".len()..]
    );
    let e = errors(&keyed);
    assert!(e.contains("`X-Api-Key` cannot be listed here: the gateway takes the API-key header off every request"), "{e}");
    let no_authz = "name = \"x\"\n[services.a]\nrun = { cargo = \"a\" }\nroutes = [{ path = \"/a/**\", authz = true }]\n";
    assert!(
        errors(no_authz).contains("`authz = true` needs `[gateway.authz]`"),
        "{}",
        errors(no_authz)
    );
}

/// Durations the platform adds to a clock or tells a program have ranges:
/// `"300000000000y"` overflowed the gateway's clock on each request of its
/// route, `ready_timeout = "1ns"` could never be met, `drain = "500ms"` was
/// told as 1 s and cut at 0.5, `hsts = "500ms"` sent `max-age=0`.
#[test]
fn durations_have_ranges() {
    for (extra, range) in [
        (
            "routes = [{ path = \"/a/**\", timeout = \"300000000000y\" }]",
            "1ms to 1d",
        ),
        ("ready_timeout = \"1ns\"", "100ms to 1h"),
        ("liveness_timeout = \"2h\"", "100ms to 1h"),
        ("drain = \"500ms\"", "1s to 1h"),
        ("scale = { idle = \"1ns\" }", "100ms to 1d"),
    ] {
        let e = errors(&with_service(extra));
        assert!(e.contains("is out of range"), "{extra}: {e}");
        assert!(e.contains(range), "{extra}: {e}");
    }
    let gateway = |table: &str| {
        format!("name = \"shop\"\n{table}\n[services.a]\nrun = {{ cargo = \"a\" }}\n")
    };
    for (table, range) in [
        ("[gateway]\ntimeout = \"2d\"", "1ms to 1d"),
        (
            "[gateway]\njwt = { issuer = \"https://id.example\", audiences = [\"shop\"], jwks = \"https://id.example/jwks.json\", refresh = \"1ms\" }",
            "1s to 1d",
        ),
        (
            "[gateway.cors]\norigins = [\"https://shop.example\"]\nmax_age = \"30d\"",
            "1s to 1d",
        ),
    ] {
        let e = errors(&gateway(table));
        assert!(e.contains("is out of range"), "{table}: {e}");
        assert!(e.contains(range), "{table}: {e}");
    }
}
