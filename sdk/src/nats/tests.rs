use super::*;

#[test]
fn credentials_leave_the_url() {
    let check = |url: &str, bare: &str| assert_eq!(connect_options(url).1, bare, "{url}");
    check("nats://127.0.0.1:4222", "nats://127.0.0.1:4222");
    check("nats://acme:s3cr3t@127.0.0.1:4222", "nats://127.0.0.1:4222");
    check("tls://token@nats.example.org", "tls://nats.example.org");
    check("user:p%40ss@localhost:4222", "localhost:4222");
    check("nats://u:p@host:4222/x?y=1", "nats://host:4222/x?y=1");
}

#[test]
fn escapes_in_credentials_are_decoded() {
    assert_eq!(percent_decode("p%40ss%3Aword"), "p@ss:word");
    assert_eq!(percent_decode("100%"), "100%");
    assert_eq!(percent_decode("%zz%4"), "%zz%4");
    assert_eq!(percent_decode("plain"), "plain");
}
