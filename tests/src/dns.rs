//! A DNS server on loopback for the identity tests: it answers TXT, MX and CNAME queries
//! (over UDP) from the records a test publishes, and NXDOMAIN for names it has none for.
//! The SES stand-in reads the same records ([`Zone`]), as SES reads the public DNS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{CNAME, MX, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

type Records = HashMap<(String, RecordType), Vec<String>>;

/// The records a test published.
#[derive(Clone, Default)]
pub struct Zone(Arc<Mutex<Records>>);

impl Zone {
    /// Publishes one record: `kind` is "TXT", "MX" or "CNAME".
    pub fn publish(&self, name: &str, kind: &str, value: &str) {
        (self.0.lock().unwrap())
            .entry((key(name), record_type(kind)))
            .or_default()
            .push(value.to_owned());
    }

    /// The values published for `name` of `kind` ("TXT", "MX" or "CNAME"; an MX value is
    /// `<preference> <exchange>`).
    pub fn lookup(&self, name: &str, kind: &str) -> Vec<String> {
        let records = self.0.lock().unwrap();
        records
            .get(&(key(name), record_type(kind)))
            .cloned()
            .unwrap_or_default()
    }
}

fn record_type(kind: &str) -> RecordType {
    match kind {
        "CNAME" => RecordType::CNAME,
        "MX" => RecordType::MX,
        _ => RecordType::TXT,
    }
}

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Zone,
    task: tokio::task::JoinHandle<()>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn answer(query: &Message, zone: &Records) -> Option<Message> {
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
                RecordType::MX => {
                    let (preference, exchange) = value.split_once(' ')?;
                    RData::MX(MX::new(
                        preference.parse().ok()?,
                        Name::from_ascii(exchange).ok()?,
                    ))
                }
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
        let zone = Zone::default();
        let served = zone.0.clone();
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

    /// Publishes one record: `kind` is "TXT", "MX" or "CNAME".
    pub fn publish(&self, name: &str, kind: &str, value: &str) {
        self.zone.publish(name, kind, value);
    }

    /// What the server answers from.
    pub fn zone(&self) -> Zone {
        self.zone.clone()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
