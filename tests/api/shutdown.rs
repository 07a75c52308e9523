//! SIGTERM: stop accepting, finish what is in flight, exit 0, leave the
//! database clean (on either backend).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tempfile::TempDir;

use crate::cli::{mint, Server};
use crate::helpers::{assert_database_sound, stored_links};

#[test]
fn sigterm_lets_an_in_flight_request_finish_then_exits_cleanly() {
    let dir = TempDir::new().unwrap();
    let token = mint(dir.path(), &["--admin"]);
    let server = Server::start(dir.path(), &[]);
    let addr = server.base.trim_start_matches("http://").to_owned();
    let body = r#"{"provider_id":"okta","linked_user_id":"in-flight","linked_username":"n"}"#;
    let (head, tail) = body.split_at(20);

    // A request whose body is half sent when the signal arrives.
    let mut stream = TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "POST /api/admin/users/v4/users/u-1/linked-identities HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
         authorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{head}",
        body.len()
    )
    .unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = server_pid(&server);
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // No new connections once stopping.
    assert!(
        TcpStream::connect(&addr).is_err(),
        "the server still accepts connections after SIGTERM"
    );
    stream.write_all(tail.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");

    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    assert_database_sound(dir.path());
    let stored = stored_links(dir.path());
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (
            stored[0].user_id.as_str(),
            stored[0].linked_user_id.as_str()
        ),
        ("u-1", "in-flight")
    );
}

fn server_pid(server: &Server) -> String {
    server.pid().to_string()
}
