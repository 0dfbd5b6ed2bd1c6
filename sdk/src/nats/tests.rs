use super::*;

#[test]
fn credentials_leave_the_url() {
    let check = |url: &str, bare: &str| {
        assert_eq!(connect_options(url).1.to_string(), bare, "{url}");
    };
    check("nats://127.0.0.1:4222", "nats://127.0.0.1:4222");
    check("nats://acme:s3cr3t@127.0.0.1:4222", "nats://127.0.0.1:4222");
    check("tls://token@nats.example.org", "tls://nats.example.org");
    check("user:p%40ss@localhost:4222", "localhost:4222");
    check("nats://u:p@host:4222/x?y=1", "nats://host:4222/x?y=1");
}

#[test]
fn a_url_may_list_several_seed_servers() {
    let (_, servers) = connect_options("nats://u:p@10.0.0.1:4222, nats://10.0.0.2:4222,,");
    assert_eq!(
        servers.urls(),
        ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
    );
    assert_eq!(
        servers.to_string(),
        "nats://10.0.0.1:4222,nats://10.0.0.2:4222"
    );
    use async_nats::ToServerAddrs as _;
    assert_eq!(servers.to_server_addrs().unwrap().count(), 2);
    let (_, found) = split_credentials("nats://u:p%40ss@10.0.0.1:4222");
    assert_eq!(found, Some(("u".into(), Some("p@ss".into()))));
    let (_, found) = split_credentials("tls://tok@host");
    assert_eq!(found, Some(("tok".into(), None)));
}

#[test]
fn escapes_in_credentials_are_decoded() {
    assert_eq!(percent_decode("p%40ss%3Aword"), "p@ss:word");
    assert_eq!(percent_decode("100%"), "100%");
    assert_eq!(percent_decode("%zz%4"), "%zz%4");
    assert_eq!(percent_decode("plain"), "plain");
}
