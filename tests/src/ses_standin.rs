//! An SES v2 stand-in: an HTTP proxy in front of the AWS emulator that answers the SES v2
//! operations the emulator lacks as the SES v2 API reference documents them, and passes
//! every other request (SQS, and the SES calls the emulator has) through to it unchanged.
//!
//! Documented behaviour implemented here:
//! - `GetAccount` (`GET /v2/email/account`): `200` with `SendQuota` (`Max24HourSend`,
//!   `MaxSendRate`, `SentLast24Hours`), `SendingEnabled`, `ProductionAccessEnabled` and
//!   `EnforcementStatus` (`HEALTHY`), as JSON. `MaxSendRate` is what the test sets.
//! - `PutConfigurationSetSendingOptions` (`PUT /v2/email/configuration-sets/{name}/sending`,
//!   body `{"SendingEnabled": bool}`): `200` with an empty object. While a configuration
//!   set's sending is disabled, `GetConfigurationSet` says so in `SendingOptions`, and a
//!   `SendEmail` naming it is refused with `400` `SendingPausedException`.
//!
//! - `CreateConfigurationSetEventDestination` (`POST
//!   /v2/email/configuration-sets/{name}/event-destinations`, body `EventDestinationName`
//!   and `EventDestination`): `200`, or `400` `AlreadyExistsException` for a name the set
//!   has; `GetConfigurationSetEventDestinations` (`GET` there) lists them as
//!   `EventDestinations`.
//! - The mailbox simulator: after a `SendEmail` the emulator accepted, each recipient at
//!   `simulator.amazonses.com` (`bounce`, `complaint` or `success`, with an optional
//!   `+label`) gets the documented event record (`Bounce`, `Complaint`, `Delivery`; `mail`
//!   with the message id, source, destination and tags, `ses:configuration-set` among them),
//!   published to the SNS topic of each enabled destination of the message's configuration
//!   set that matches the event's type. The emulator's SNS delivers it to the queues
//!   subscribed to that topic, in SNS's notification envelope.
//!
//! - Bring-your-own DKIM: `CreateEmailIdentity` with `DkimSigningAttributes` and
//!   `PutEmailIdentityDkimSigningAttributes` (`PUT /v2/email/identities/{domain}/dkim/signing`,
//!   origin `EXTERNAL`; answered with `DkimStatus` and `DkimTokens`) set the identity's
//!   selector and key; `GetEmailIdentity` then answers `DkimAttributes` with
//!   `SigningAttributesOrigin` `EXTERNAL`, `SigningEnabled`, the selector as its one token,
//!   and `Status` `SUCCESS` once DNS ([`crate::dns::Zone`], given with
//!   [`SesStandIn::resolve_with`]) has a `v=DKIM1` TXT record at
//!   `<selector>._domainkey.<domain>`, `PENDING` until then.
//! - Custom MAIL FROM: `PutEmailIdentityMailFromAttributes` (`PUT
//!   /v2/email/identities/{domain}/mail-from`, body `MailFromDomain` and
//!   `BehaviorOnMxFailure`): `200` with an empty object; `GetEmailIdentity` then answers
//!   `MailFromAttributes` with `MailFromDomainStatus` `SUCCESS` once DNS has an MX record of
//!   the MAIL FROM domain to `feedback-smtp.<region>.amazonses.com` (the region the request
//!   was signed for), `PENDING` until then.
//! - SES tenants: `CreateTenant` (`POST /v2/email/tenants`; `AlreadyExistsException` for a
//!   name it has), `GetTenant` (`POST /v2/email/tenants/get`, answering `Tenant` with its
//!   `SendingStatus`), `DeleteTenant` (`POST /v2/email/tenants/delete`) and
//!   `CreateTenantResourceAssociation` (`POST /v2/email/tenants/resources`;
//!   `AlreadyExistsException` for an association it has), each `NotFoundException` for an
//!   unknown tenant. A tenant's ARN is `arn:aws:ses:<region>:123456789012:tenant/<name>/<id>`.
//! - Reputation entities (a tenant, by its ARN, type `RESOURCE`):
//!   `UpdateReputationEntityPolicy` (`PUT .../policy`, `BadRequestException` for a policy
//!   ARN that is not `arn:<partition>:ses:<region>:aws:reputation-policy/none|standard|strict`),
//!   `UpdateReputationEntityCustomerManagedStatus` (`PUT .../customer-managed-status`,
//!   `SendingStatus` `ENABLED`, `DISABLED` or `REINSTATED`) and `GetReputationEntity` (`GET`,
//!   answering `ReputationEntity` with the policy and statuses). A tenant whose status is
//!   `DISABLED` has `SendingStatus` `DISABLED`, and a `SendEmail` naming it as `TenantName`
//!   is refused with `400` `SendingPausedException`.
//!
//! It also notes each `SendEmail` (`POST /v2/email/outbound-emails`) the emulator accepted:
//! when, with which configuration set and to how many recipients (`Destination`'s three
//! lists), so a test can check whose mail went out and at what rate.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use crate::dns::Zone;

/// One `SendEmail` the emulator accepted.
#[derive(Debug, Clone)]
pub struct Sent {
    pub at: Instant,
    pub configuration_set: String,
    /// The message's `message_id` tag (cellmail's id of it).
    pub message_id: String,
    pub recipients: usize,
}

/// One SES tenant.
#[derive(Debug, Clone)]
pub struct SesTenant {
    pub arn: String,
    pub id: String,
    pub created_at: i64,
    /// The ARN of its reputation policy.
    pub policy: String,
    /// `ENABLED`, `DISABLED` or `REINSTATED`, as set by `UpdateReputationEntityCustomerManagedStatus`.
    pub status: String,
    /// The ARNs of the resources associated with it.
    pub resources: Vec<String>,
}

impl SesTenant {
    fn sending_status(&self) -> &str {
        if self.status == "DISABLED" {
            "DISABLED"
        } else {
            "ENABLED"
        }
    }

    fn json(&self, name: &str) -> Value {
        json!({
            "TenantName": name,
            "TenantId": self.id,
            "TenantArn": self.arn,
            "CreatedTimestamp": self.created_at,
            "Tags": [],
            "SendingStatus": self.sending_status(),
        })
    }
}

/// What the stand-in answers for the account, and what it saw.
struct State {
    max_send_rate: f64,
    /// The configuration sets whose sending is disabled.
    disabled: Mutex<HashSet<String>>,
    /// Each configuration set's event destinations (as created: a name and a definition).
    destinations: Mutex<HashMap<String, Vec<Value>>>,
    /// Each identity's own DKIM selector and private key.
    dkim: Mutex<HashMap<String, (String, String)>>,
    /// Each identity's MAIL FROM domain and behaviour on MX failure.
    mail_from: Mutex<HashMap<String, (String, String)>>,
    /// Where the statuses' DNS records are looked up (none: nothing is found).
    dns: Mutex<Zone>,
    /// SES tenants by name.
    tenants: Mutex<HashMap<String, SesTenant>>,
    sent: Mutex<Vec<Sent>>,
}

pub struct SesStandIn {
    /// `http://host:port`, for `--aws-endpoint`.
    pub endpoint: String,
    state: Arc<State>,
}

impl SesStandIn {
    /// A stand-in for an account that may send to `max_send_rate` recipients a second.
    pub async fn start(max_send_rate: f64) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(State {
            max_send_rate,
            disabled: Mutex::default(),
            destinations: Mutex::default(),
            dkim: Mutex::default(),
            mail_from: Mutex::default(),
            dns: Mutex::default(),
            tenants: Mutex::default(),
            sent: Mutex::default(),
        });
        let serving = state.clone();
        crate::serve_http(listener, move |request| answer(serving.clone(), request));
        Ok(Self { endpoint, state })
    }

    /// The DKIM selector and private key (base64 DER) identity `domain` signs with, when it
    /// was given its own.
    pub fn dkim_of(&self, domain: &str) -> Option<(String, String)> {
        self.state.dkim.lock().unwrap().get(domain).cloned()
    }

    /// SES tenant `name`, if SES has it.
    pub fn tenant(&self, name: &str) -> Option<SesTenant> {
        self.state.tenants.lock().unwrap().get(name).cloned()
    }

    /// The MAIL FROM domain identity `domain` was given, if any.
    pub fn mail_from_of(&self, domain: &str) -> Option<String> {
        let set = self.state.mail_from.lock().unwrap();
        set.get(domain).map(|(name, _)| name.clone())
    }

    /// Looks identities' DNS records up in `zone` from now on.
    pub fn resolve_with(&self, zone: Zone) {
        *self.state.dns.lock().unwrap() = zone;
    }

    /// The `SendEmail` calls that went through so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.state.sent.lock().unwrap().clone()
    }
}

type Answer = Response<Full<Bytes>>;

impl State {
    /// `SUCCESS` once DNS has the key record of `selector` of `domain`, else `PENDING`.
    fn dkim_status(&self, domain: &str, selector: &str) -> &'static str {
        let name = format!("{selector}._domainkey.{domain}");
        let published = (self.dns.lock().unwrap().lookup(&name, "TXT").iter())
            .any(|txt| txt.replace(' ', "").starts_with("v=DKIM1;"));
        if published { "SUCCESS" } else { "PENDING" }
    }
}

/// The region a request was signed for (its SigV4 credential scope).
fn signed_region(headers: &hyper::HeaderMap) -> String {
    let authorization = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    authorization
        .split("Credential=")
        .nth(1)
        .and_then(|scope| scope.split('/').nth(2))
        .unwrap_or("")
        .to_owned()
}

async fn answer(state: Arc<State>, request: Request<Incoming>) -> anyhow::Result<Answer> {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    if method == Method::GET && path == "/v2/email/account" {
        let account = json!({
            "SendQuota": {
                "Max24HourSend": 1_000_000.0,
                "MaxSendRate": state.max_send_rate,
                "SentLast24Hours": 0.0,
            },
            "SendingEnabled": true,
            "ProductionAccessEnabled": true,
            "EnforcementStatus": "HEALTHY",
            "DedicatedIpAutoWarmupEnabled": false,
        });
        return Ok(json_answer(StatusCode::OK, account));
    }
    let set = segments(&path, "/v2/email/configuration-sets/");
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap_or_default();
    if let Some(answer) = tenants(&state, &method, &path, &json, &parts.headers) {
        return Ok(answer);
    }
    let identity = segments(&path, "/v2/email/identities/");
    let own_key = |attributes: &Value| {
        let selector = attributes["DomainSigningSelector"].as_str()?;
        let key = attributes["DomainSigningPrivateKey"].as_str()?;
        Some((selector.to_owned(), key.to_owned()))
    };
    match (&method, identity.as_deref()) {
        (&Method::PUT, Some([domain, dkim, signing])) if dkim == "dkim" && signing == "signing" => {
            let Some(key) = own_key(&json["SigningAttributes"]) else {
                let refusal = json!({ "message": "SigningAttributes are required for EXTERNAL." });
                return Ok(error_answer("BadRequestException", refusal));
            };
            let status = state.dkim_status(domain, &key.0);
            let tokens = json!([key.0]);
            state.dkim.lock().unwrap().insert(domain.clone(), key);
            return Ok(json_answer(
                StatusCode::OK,
                json!({ "DkimStatus": status, "DkimTokens": tokens }),
            ));
        }
        (&Method::PUT, Some([domain, mail_from])) if mail_from == "mail-from" => {
            let (Some(name), behaviour) = (
                json["MailFromDomain"].as_str(),
                json["BehaviorOnMxFailure"]
                    .as_str()
                    .unwrap_or("USE_DEFAULT_VALUE"),
            ) else {
                let refusal = json!({ "message": "MailFromDomain is required." });
                return Ok(error_answer("BadRequestException", refusal));
            };
            let set = (name.to_owned(), behaviour.to_owned());
            state.mail_from.lock().unwrap().insert(domain.clone(), set);
            return Ok(json_answer(StatusCode::OK, json!({})));
        }
        (&Method::GET, Some([domain])) => {
            let region = signed_region(&parts.headers);
            let answer = to_emulator(Request::from_parts(parts, Full::new(body))).await?;
            if !answer.status().is_success() {
                return Ok(answer);
            }
            let mut got = json_of(answer).await?;
            let own = state.dkim.lock().unwrap().get(domain).cloned();
            if let Some((selector, _)) = own {
                got["DkimAttributes"] = json!({
                    "SigningEnabled": true,
                    "Status": state.dkim_status(domain, &selector),
                    "Tokens": [selector],
                    "SigningAttributesOrigin": "EXTERNAL",
                });
            }
            let mail_from = state.mail_from.lock().unwrap().get(domain).cloned();
            if let Some((name, behaviour)) = mail_from {
                let endpoint = format!("feedback-smtp.{region}.amazonses.com");
                let found = (state.dns.lock().unwrap().lookup(&name, "MX").iter())
                    .any(|mx| mx.split_whitespace().last() == Some(endpoint.as_str()));
                got["MailFromAttributes"] = json!({
                    "MailFromDomain": name,
                    "MailFromDomainStatus": if found { "SUCCESS" } else { "PENDING" },
                    "BehaviorOnMxFailure": behaviour,
                });
            }
            return Ok(json_answer(StatusCode::OK, got));
        }
        _ => {}
    }
    // An identity created with its own key signs with it, once the emulator made it.
    let created_with_key = (method == Method::POST && path == "/v2/email/identities")
        .then(|| json["EmailIdentity"].as_str().map(str::to_owned))
        .flatten()
        .zip(own_key(&json["DkimSigningAttributes"]));
    match (&method, set.as_deref()) {
        (&Method::PUT, Some([name, sending])) if sending == "sending" => {
            let mut disabled = state.disabled.lock().unwrap();
            if json["SendingEnabled"] == false {
                disabled.insert(name.clone());
            } else {
                disabled.remove(name);
            }
            return Ok(json_answer(StatusCode::OK, json!({})));
        }
        (&Method::POST, Some([name, what])) if what == "event-destinations" => {
            let mut destinations = state.destinations.lock().unwrap();
            let of_set = destinations.entry(name.clone()).or_default();
            let wanted = &json["EventDestinationName"];
            if of_set.iter().any(|d| d["Name"] == *wanted) {
                let refusal =
                    json!({ "message": format!("Event destination {wanted} already exists.") });
                return Ok(error_answer("AlreadyExistsException", refusal));
            }
            let mut destination = json["EventDestination"].clone();
            destination["Name"] = wanted.clone();
            of_set.push(destination);
            return Ok(json_answer(StatusCode::OK, json!({})));
        }
        (&Method::GET, Some([name, what])) if what == "event-destinations" => {
            let destinations = state.destinations.lock().unwrap();
            let listed = destinations.get(name).cloned().unwrap_or_default();
            return Ok(json_answer(
                StatusCode::OK,
                json!({ "EventDestinations": listed }),
            ));
        }
        (&Method::GET, Some([name])) => {
            let answer = to_emulator(Request::from_parts(parts, Full::new(body))).await?;
            if !answer.status().is_success() {
                return Ok(answer);
            }
            let mut got = json_of(answer).await?;
            let enabled = !state.disabled.lock().unwrap().contains(name);
            got["SendingOptions"] = json!({ "SendingEnabled": enabled });
            return Ok(json_answer(StatusCode::OK, got));
        }
        _ => {}
    }
    let sending = method == Method::POST && path == "/v2/email/outbound-emails";
    let configuration_set = json["ConfigurationSetName"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let tenant_paused = json["TenantName"].as_str().is_some_and(|name| {
        let tenants = state.tenants.lock().unwrap();
        tenants
            .get(name)
            .is_some_and(|t| t.sending_status() == "DISABLED")
    });
    if sending && (tenant_paused || state.disabled.lock().unwrap().contains(&configuration_set)) {
        let refusal = json!({ "message": "Sending is paused for this configuration set." });
        return Ok(error_answer("SendingPausedException", refusal));
    }
    let answer = to_emulator(Request::from_parts(parts, Full::new(body))).await?;
    if let Some((domain, key)) = created_with_key
        && answer.status().is_success()
    {
        state.dkim.lock().unwrap().insert(domain, key);
        // The emulator answers with the key's time as text where SES has epoch seconds:
        // answered as SES documents it, with the identity's own key.
        let mut got = json_of(answer).await?;
        got["DkimAttributes"]["SigningAttributesOrigin"] = json!("EXTERNAL");
        got["DkimAttributes"]["LastKeyGenerationTimestamp"] =
            json!(jiff::Timestamp::now().as_second());
        return Ok(json_answer(StatusCode::OK, got));
    }
    if !(sending && answer.status().is_success()) {
        return Ok(answer);
    }
    let (parts, got) = answer.into_parts();
    let got = got.collect().await?.to_bytes();
    let message_id = serde_json::from_slice::<Value>(&got).unwrap_or_default()["MessageId"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    state.sent.lock().unwrap().push(Sent {
        at: Instant::now(),
        configuration_set: configuration_set.clone(),
        message_id: (json["EmailTags"].as_array().into_iter().flatten())
            .find(|tag| tag["Name"] == "message_id")
            .and_then(|tag| tag["Value"].as_str())
            .unwrap_or("")
            .to_owned(),
        recipients: addresses(&json).len(),
    });
    let destinations = (state.destinations.lock().unwrap())
        .get(&configuration_set)
        .cloned()
        .unwrap_or_default();
    for (kind, record) in simulated(&json, &message_id, &configuration_set) {
        for topic in topics(&destinations, kind) {
            publish(&topic, &record).await?;
        }
    }
    Ok(Response::from_parts(parts, Full::new(got)))
}

/// The answer to an SES tenant or reputation entity operation, `None` for any other.
fn tenants(
    state: &State,
    method: &Method,
    path: &str,
    json: &Value,
    headers: &hyper::HeaderMap,
) -> Option<Answer> {
    let mut tenants = state.tenants.lock().unwrap();
    let name = json["TenantName"].as_str().unwrap_or("").to_owned();
    let not_found = |what: &str| {
        let refusal = json!({ "message": format!("{what} does not exist.") });
        error_answer("NotFoundException", refusal)
    };
    let ok = || json_answer(StatusCode::OK, json!({}));
    if let Some(entity) = segments(path, "/v2/email/reputation/entities/RESOURCE/") {
        let reference = percent_encoding::percent_decode_str(entity.first()?)
            .decode_utf8_lossy()
            .into_owned();
        let Some(tenant) = tenants.values_mut().find(|t| t.arn == reference) else {
            return Some(not_found(&format!("Reputation entity {reference}")));
        };
        return Some(match (method, entity.get(1).map(String::as_str)) {
            (&Method::PUT, Some("policy")) => {
                let policy = json["ReputationEntityPolicy"].as_str().unwrap_or("");
                let parts: Vec<&str> = policy.splitn(6, ':').collect();
                let known =
                    ["none", "standard", "strict"].map(|p| format!("reputation-policy/{p}"));
                if parts.len() != 6
                    || (parts[0], parts[2], parts[4]) != ("arn", "ses", "aws")
                    || !known.iter().any(|k| k == parts[5])
                {
                    let refusal = json!({ "message": format!("Invalid policy ARN {policy}.") });
                    return Some(error_answer("BadRequestException", refusal));
                }
                tenant.policy = policy.to_owned();
                ok()
            }
            (&Method::PUT, Some("customer-managed-status")) => {
                tenant.status = json["SendingStatus"]
                    .as_str()
                    .unwrap_or("ENABLED")
                    .to_owned();
                ok()
            }
            (&Method::GET, None) => json_answer(
                StatusCode::OK,
                json!({ "ReputationEntity": {
                    "ReputationEntityReference": tenant.arn,
                    "ReputationEntityType": "RESOURCE",
                    "ReputationManagementPolicy": tenant.policy,
                    "CustomerManagedStatus": { "Status": tenant.status },
                    "AwsSesManagedStatus": { "Status": "ENABLED" },
                    "SendingStatusAggregate": tenant.sending_status(),
                }}),
            ),
            _ => return None,
        });
    }
    Some(match (method, path) {
        (&Method::POST, "/v2/email/tenants") => {
            if tenants.contains_key(&name) {
                let refusal = json!({ "message": format!("Tenant {name} already exists.") });
                return Some(error_answer("AlreadyExistsException", refusal));
            }
            let region = signed_region(headers);
            let id = format!("tn-{:016x}", rand::random::<u64>());
            let tenant = SesTenant {
                arn: format!("arn:aws:ses:{region}:123456789012:tenant/{name}/{id}"),
                id,
                created_at: jiff::Timestamp::now().as_second(),
                policy: format!("arn:aws:ses:{region}:aws:reputation-policy/standard"),
                status: "ENABLED".into(),
                resources: Vec::new(),
            };
            let answer = json_answer(StatusCode::OK, tenant.json(&name));
            tenants.insert(name, tenant);
            answer
        }
        (&Method::POST, "/v2/email/tenants/get") => match tenants.get(&name) {
            Some(tenant) => json_answer(StatusCode::OK, json!({ "Tenant": tenant.json(&name) })),
            None => not_found(&format!("Tenant {name}")),
        },
        (&Method::POST, "/v2/email/tenants/delete") => match tenants.remove(&name) {
            Some(_) => ok(),
            None => not_found(&format!("Tenant {name}")),
        },
        (&Method::POST, "/v2/email/tenants/resources") => {
            let Some(tenant) = tenants.get_mut(&name) else {
                return Some(not_found(&format!("Tenant {name}")));
            };
            let resource = json["ResourceArn"].as_str().unwrap_or("").to_owned();
            if tenant.resources.contains(&resource) {
                let refusal = json!({ "message": format!("{resource} is associated already.") });
                return Some(error_answer("AlreadyExistsException", refusal));
            }
            tenant.resources.push(resource);
            ok()
        }
        _ => return None,
    })
}

/// An SES v2 error of type `kind`: `404` for `NotFoundException`, else `400`.
fn error_answer(kind: &'static str, body: Value) -> Answer {
    let status = match kind {
        "NotFoundException" => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    };
    let mut answer = json_answer(status, body);
    (answer.headers_mut()).insert("x-amzn-errortype", HeaderValue::from_static(kind));
    answer
}

/// The SNS topics of `destinations` that are enabled and publish events of `kind`.
fn topics(destinations: &[Value], kind: &str) -> Vec<String> {
    destinations
        .iter()
        .filter(|d| d["Enabled"] != false)
        .filter(|d| {
            (d["MatchingEventTypes"].as_array())
                .is_some_and(|types| types.iter().any(|t| t == kind))
        })
        .filter_map(|d| d["SnsDestination"]["TopicArn"].as_str().map(str::to_owned))
        .collect()
}

/// The event records SES's mailbox simulator makes for a `SendEmail` request's simulator
/// recipients, each with its event type's name in `MatchingEventTypes`.
fn simulated(
    request: &Value,
    message_id: &str,
    configuration_set: &str,
) -> Vec<(&'static str, Value)> {
    let now = jiff::Timestamp::now().to_string();
    let recipients = addresses(request);
    let mut tags = json!({ "ses:configuration-set": [configuration_set] });
    for tag in request["EmailTags"].as_array().into_iter().flatten() {
        if let Some(name) = tag["Name"].as_str() {
            tags[name] = json!([tag["Value"]]);
        }
    }
    let mail = json!({
        "timestamp": now,
        "source": request["FromEmailAddress"],
        "sendingAccountId": "123456789012",
        "messageId": message_id,
        "destination": recipients,
        "headersTruncated": false,
        "tags": tags,
    });
    recipients
        .iter()
        .filter_map(|address| {
            let (local, domain) = address.rsplit_once('@')?;
            if !domain.eq_ignore_ascii_case("simulator.amazonses.com") {
                return None;
            }
            let mailbox = local
                .split('+')
                .next()
                .unwrap_or(local)
                .to_ascii_lowercase();
            let (kind, name, detail) = match mailbox.as_str() {
                "bounce" => (
                    "BOUNCE",
                    "bounce",
                    json!({
                        "bounceType": "Permanent",
                        "bounceSubType": "General",
                        "bouncedRecipients": [{
                            "emailAddress": address,
                            "action": "failed",
                            "status": "5.1.1",
                            "diagnosticCode": "smtp; 550 5.1.1 user unknown",
                        }],
                        "timestamp": now,
                        "feedbackId": format!("{message_id}-bounce"),
                        "reportingMTA": "dsn; a1-2.smtp-out.amazonses.com",
                    }),
                ),
                "complaint" => (
                    "COMPLAINT",
                    "complaint",
                    json!({
                        "complainedRecipients": [{ "emailAddress": address }],
                        "timestamp": now,
                        "feedbackId": format!("{message_id}-complaint"),
                        "complaintFeedbackType": "abuse",
                    }),
                ),
                "success" => (
                    "DELIVERY",
                    "delivery",
                    json!({
                        "timestamp": now,
                        "processingTimeMillis": 500,
                        "recipients": [address],
                        "smtpResponse": "250 2.6.0 Message received",
                        "reportingMTA": "a1-2.smtp-out.amazonses.com",
                    }),
                ),
                _ => return None,
            };
            let event_type = format!("{}{}", name[..1].to_ascii_uppercase(), &name[1..]);
            let mut record = json!({ "eventType": event_type, "mail": mail.clone() });
            record[name] = detail;
            Some((kind, record))
        })
        .collect()
}

/// Publishes `record` to SNS topic `topic` on the emulator.
async fn publish(topic: &str, record: &Value) -> anyhow::Result<()> {
    let sns = aws_sdk_sns::Client::new(&crate::emulator::aws_config().await);
    sns.publish()
        .topic_arn(topic)
        .message(record.to_string())
        .send()
        .await?;
    Ok(())
}

/// The segments of `path` after `prefix`, if it starts with it.
fn segments(path: &str, prefix: &str) -> Option<Vec<String>> {
    let rest = path.strip_prefix(prefix)?;
    Some(rest.split('/').map(str::to_owned).collect())
}

/// The JSON body of an emulator's answer.
async fn json_of(answer: Answer) -> anyhow::Result<Value> {
    let body = answer.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

fn json_answer(status: StatusCode, body: Value) -> Answer {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a static answer")
}

/// The recipients a `SendEmail` request names.
fn addresses(request: &Value) -> Vec<String> {
    ["ToAddresses", "CcAddresses", "BccAddresses"]
        .iter()
        .filter_map(|list| request["Destination"][list].as_array())
        .flatten()
        .filter_map(Value::as_str)
        // `Name <local@domain>` or the bare address.
        .map(|address| {
            let bare = address.rsplit('<').next().unwrap_or(address);
            bare.trim_end_matches('>').to_owned()
        })
        .collect()
}

/// `request` as the emulator answers it, over a connection of its own.
async fn to_emulator(request: Request<Full<Bytes>>) -> anyhow::Result<Answer> {
    let stream = TcpStream::connect(crate::emulator::emulator()).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let (parts, body) = sender.send_request(request).await?.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
