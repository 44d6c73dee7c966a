//! Each manifest error and the message a user sees for it.

use std::path::Path;

use crate::{Auth, Data, Manifest, Run, Shape};

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
