//! A DNS server on loopback for the identity tests: it answers TXT and CNAME queries (over
//! UDP) from the records a test publishes, and NXDOMAIN for names it has none for.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{CNAME, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

type Zone = HashMap<(String, RecordType), Vec<String>>;

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    task: tokio::task::JoinHandle<()>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn answer(query: &Message, zone: &Zone) -> Option<Message> {
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    let mut known_name = false;
    for q in &query.queries {
        response.add_query(q.clone());
        let name = key(&q.name.to_string());
        known_name |= zone.keys().any(|(n, _)| *n == name);
        for value in zone.get(&(name, q.query_type)).into_iter().flatten() {
            let data = match q.query_type {
                RecordType::CNAME => RData::CNAME(CNAME(Name::from_ascii(value).ok()?)),
                // A TXT record's strings are at most 255 bytes: a long value (a DKIM key)
                // is published as several, as DNS operators do.
                _ => RData::TXT(TXT::new(
                    value
                        .as_bytes()
                        .chunks(255)
                        .map(|c| String::from_utf8_lossy(c).into_owned())
                        .collect(),
                )),
            };
            response.add_answer(Record::from_rdata(q.name.clone(), 0, data));
        }
    }
    if !known_name {
        response.metadata.response_code = ResponseCode::NXDomain;
    }
    Some(response)
}

impl DnsServer {
    pub async fn start() -> anyhow::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let addr = socket.local_addr()?;
        let zone = Arc::new(Mutex::new(Zone::new()));
        let served = zone.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                let response = answer(&query, &served.lock().unwrap());
                if let Some(bytes) = response.and_then(|r| r.to_vec().ok()) {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        Ok(Self { addr, zone, task })
    }

    /// Publishes one record: `kind` is "TXT" or "CNAME".
    pub fn publish(&self, name: &str, kind: &str, value: &str) {
        let kind = if kind == "CNAME" {
            RecordType::CNAME
        } else {
            RecordType::TXT
        };
        self.zone
            .lock()
            .unwrap()
            .entry((key(name), kind))
            .or_default()
            .push(value.to_owned());
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
