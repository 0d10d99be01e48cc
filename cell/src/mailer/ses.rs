//! The production mailer: SES v2 `SendEmail`.
//!
//! Every tenant sends through its own configuration set (`<prefix><tenant id>`), so SES's
//! metrics, event publishing and reputation can be told apart per tenant, and every message
//! carries cellmail's tags (`tenant_id`, `message_class`, `message_id`, then its own), which
//! is how SES's events are attributed back to a tenant and a message ([`crate::feedback`]).
//! With `--ses-tenants` each tenant is also an SES tenant and sends with its `TenantName`, so
//! SES can pause one tenant for its reputation instead of the whole account.
//!
//! Before a tenant's first send the mailer provisions what the send needs: the tenant's
//! configuration set with its event destination (to the cell's events topic, so SES's
//! events reach the cell's feedback queue), the From domain's email identity (signing with
//! the domain's own DKIM key: the same selector and key on every cell, so a move needs no DNS
//! change) and, with tenants on, the SES tenant and its association with the configuration
//! set. Each is created, and an answer that it already exists (a restart, another cell) is as
//! good, once per process. An endpoint without SES tenants (an emulator) gets a warning and
//! sends without `TenantName`. An
//! offboarded tenant's configuration set and SES tenant are deleted ([`Mailer::forget`]).
//!
//! [`classify`] says what an SES error means for the message: retry it later, pause the
//! cell's sending because the account's sending is paused, or give up because SES refuses
//! the message itself.
//!
//! Sends keep to the account's `MaxSendRate` ([`super::quota`]). The SDK retries nothing
//! (the queue retries a message, with its backoff, and a retry by the SDK would bypass the
//! rate), and every call has a timeout: [`CALL_TIMEOUT`] in all, [`CONNECT_TIMEOUT`] to
//! connect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_sesv2::Client;
use aws_sdk_sesv2::config::http::HttpResponse;
use aws_sdk_sesv2::config::retry::RetryConfig;
use aws_sdk_sesv2::config::timeout::TimeoutConfig;
use aws_sdk_sesv2::error::{BuildError, DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sesv2::operation::create_configuration_set_event_destination::CreateConfigurationSetEventDestinationError;
use aws_sdk_sesv2::operation::create_email_identity::CreateEmailIdentityError;
use aws_sdk_sesv2::operation::create_tenant::CreateTenantError;
use aws_sdk_sesv2::operation::create_tenant_resource_association::CreateTenantResourceAssociationError;
use aws_sdk_sesv2::operation::delete_configuration_set::DeleteConfigurationSetError;
use aws_sdk_sesv2::operation::delete_tenant::DeleteTenantError;
use aws_sdk_sesv2::operation::get_configuration_set::GetConfigurationSetError;
use aws_sdk_sesv2::operation::get_email_identity::GetEmailIdentityError;
use aws_sdk_sesv2::operation::get_tenant::GetTenantError;
use aws_sdk_sesv2::operation::send_email::SendEmailError;
use aws_sdk_sesv2::operation::send_email::builders::SendEmailFluentBuilder;
use aws_sdk_sesv2::types::{
    BehaviorOnMxFailure, Body, Content, Destination, DkimSigningAttributes,
    DkimSigningAttributesOrigin, EmailContent, EventDestinationDefinition, MessageHeader,
    MessageTag, ReputationEntityType, SendingStatus, SnsDestination,
};
use cellmail_proto::TenantId;
use cellmail_registry::schema::ReputationPolicy;
use tokio::sync::OnceCell;

use super::quota::SendRate;
use super::route;
use super::{Identity, IdentityStatus, Mailer, MailerError, Sending, Setup, mailbox_text};
use crate::message::{Mailbox, Message};

pub const DEFAULT_CONFIGURATION_SET_PREFIX: &str = "cellmail-";
/// How long a message waits while the account's sending is paused.
const SENDING_PAUSED_RETRY: Duration = Duration::from_secs(60);
const CHARSET: &str = "UTF-8";
/// The name of each configuration set's event destination.
pub const EVENT_DESTINATION: &str = "cellmail-events";
/// The longest an SES call may take, whatever it is.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How the SES mailer names and isolates tenants.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct SesSettings {
    /// Prefix of each tenant's SES configuration set, `<prefix><tenant id>`.
    #[arg(
        long = "ses-configuration-set-prefix",
        env = "CELLMAIL_SES_CONFIGURATION_SET_PREFIX",
        default_value = DEFAULT_CONFIGURATION_SET_PREFIX
    )]
    pub configuration_set_prefix: String,
    /// Make each tenant an SES tenant and send with its TenantName.
    #[arg(long = "ses-tenants", env = "CELLMAIL_SES_TENANTS")]
    pub tenant_names: bool,
    /// Seconds between two readings of SES's sending status (the account's, and each
    /// tenant's configuration set and SES tenant), so that a pause whose event was lost is
    /// noticed, and a resumed tenant released.
    #[arg(
        long = "ses-reconcile-secs",
        env = "CELLMAIL_SES_RECONCILE_SECS",
        default_value_t = DEFAULT_RECONCILE_SECS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub reconcile_secs: u64,
}

const DEFAULT_RECONCILE_SECS: u64 = 300;

impl Default for SesSettings {
    fn default() -> Self {
        Self {
            configuration_set_prefix: DEFAULT_CONFIGURATION_SET_PREFIX.to_owned(),
            tenant_names: false,
            reconcile_secs: DEFAULT_RECONCILE_SECS,
        }
    }
}

/// What a send needs to exist in SES, provisioned once per process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Provision {
    /// The tenant's configuration set and, with tenants on, its SES tenant with this
    /// reputation policy.
    Tenant(TenantId, ReputationPolicy),
    /// A From domain's email identity, signing with the DKIM key of this selector if any.
    Domain(String, Option<String>),
    /// With tenants on, a domain's identity associated with the tenant's SES tenant.
    Association(TenantId, String),
}

impl Provision {
    fn of(&self, tenant: &TenantId) -> bool {
        matches!(self, Provision::Tenant(t, _) | Provision::Association(t, _) if t == tenant)
    }
}

pub struct SesMailer {
    client: Client,
    settings: SesSettings,
    rate: SendRate,
    /// The cell's events topic ([`super::route`]), which each configuration set publishes
    /// to; `None` when the cell has no SQS feedback queue.
    events_topic: Option<String>,
    /// What was provisioned, with the SES tenant's ARN for a tenant's.
    provisioned: Mutex<HashMap<Provision, Arc<OnceCell<Option<String>>>>>,
    /// Set once the endpoint turned out to have no SES tenants.
    tenants_unsupported: AtomicBool,
    /// The region the client sends in.
    region: Option<String>,
}

impl SesMailer {
    pub fn new(config: &SdkConfig, settings: SesSettings, events_topic: Option<String>) -> Self {
        let region = config.region().map(|r| r.to_string());
        let timeouts = TimeoutConfig::builder()
            .operation_timeout(CALL_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build();
        let config = aws_sdk_sesv2::config::Builder::from(config)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            .build();
        Self {
            client: Client::from_conf(config),
            settings,
            rate: SendRate::default(),
            events_topic,
            provisioned: Mutex::new(HashMap::new()),
            tenants_unsupported: AtomicBool::new(false),
            region,
        }
    }

    fn configuration_set(&self, tenant: &TenantId) -> String {
        format!("{}{tenant}", self.settings.configuration_set_prefix)
    }

    fn tenant_names(&self) -> bool {
        self.settings.tenant_names && !self.tenants_unsupported.load(Ordering::Relaxed)
    }

    fn without_tenants(&self) {
        if !self.tenants_unsupported.swap(true, Ordering::Relaxed) {
            tracing::warn!("the SES endpoint has no tenants; sending without TenantName");
        }
    }

    /// Runs `provision` for `key` until it succeeds once, and answers what that run did:
    /// concurrent first sends share one run, and a failed run is tried again by the next send.
    async fn once<F, Fut>(
        &self,
        key: Provision,
        provision: F,
    ) -> Result<Option<String>, MailerError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<String>, MailerError>>,
    {
        let cell = self
            .provisioned
            .lock()
            // The map is only changed by whole statements that cannot panic halfway.
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .clone();
        cell.get_or_try_init(provision).await.cloned()
    }

    /// The tenant's configuration set (and SES tenant) and its identities.
    async fn provision(&self, tenant: &TenantId, setup: &Setup) -> Result<(), MailerError> {
        let reputation = setup.reputation;
        let key = Provision::Tenant(tenant.clone(), reputation);
        let tenant_arn = self
            .once(key, || self.provision_tenant(tenant, reputation))
            .await?;
        for identity in &setup.identities {
            let selector = identity.dkim.as_ref().map(|d| d.selector.clone());
            self.once(
                Provision::Domain(identity.domain.clone(), selector),
                || async { self.provision_identity(identity).await.map(|()| None) },
            )
            .await?;
            if let Some(tenant_arn) = &tenant_arn {
                let key = Provision::Association(tenant.clone(), identity.domain.clone());
                let resource = format!("identity/{}", identity.domain);
                self.once(key, || async {
                    (self.associate(tenant, tenant_arn, &resource).await).map(|()| None)
                })
                .await?;
            }
        }
        Ok(())
    }

    /// The tenant's configuration set with its event destination and, with tenants on, its
    /// SES tenant (whose ARN this answers) with its reputation policy and the set associated.
    async fn provision_tenant(
        &self,
        tenant: &TenantId,
        reputation: ReputationPolicy,
    ) -> Result<Option<String>, MailerError> {
        let name = self.configuration_set(tenant);
        let made = self
            .client
            .create_configuration_set()
            .configuration_set_name(&name)
            .send()
            .await;
        settled(&format!("configuration set {name}"), made, |e| {
            e.is_already_exists_exception()
                // SES v1's code for it, which moto answers this v2 call with.
                || e.code() == Some("ConfigurationSetAlreadyExistsException")
        })?;
        if let Some(topic) = &self.events_topic {
            self.provision_events(&name, topic).await?;
        }
        if !self.tenant_names() {
            return Ok(None);
        }
        self.provision_ses_tenant(tenant, &name, reputation).await
    }

    /// The configuration set's event destination: every event of [`route::EVENTS`] to the
    /// cell's events topic.
    async fn provision_events(
        &self,
        configuration_set: &str,
        topic: &str,
    ) -> Result<(), MailerError> {
        let what = format!("the event destination of configuration set {configuration_set}");
        let destination = EventDestinationDefinition::builder()
            .enabled(true)
            .set_matching_event_types(Some(route::EVENTS.to_vec()))
            .sns_destination(
                SnsDestination::builder()
                    .topic_arn(topic)
                    .build()
                    .map_err(|e| setup_failed(&what, e))?,
            )
            .build();
        let made = self
            .client
            .create_configuration_set_event_destination()
            .configuration_set_name(configuration_set)
            .event_destination_name(EVENT_DESTINATION)
            .event_destination(destination)
            .send()
            .await;
        match made {
            Err(err) if unsupported(&err) => {
                tracing::warn!(
                    configuration_set,
                    "the SES endpoint has no event destinations; this cell gets no SES events"
                );
                Ok(())
            }
            made => settled(
                &what,
                made,
                CreateConfigurationSetEventDestinationError::is_already_exists_exception,
            ),
        }
    }

    /// The domain's email identity, signing with the domain's own DKIM key when it has one
    /// (an identity made before, with SES's keys or an older key of the domain, is switched
    /// to it).
    async fn provision_identity(&self, identity: &Identity) -> Result<(), MailerError> {
        let domain = identity.domain.as_str();
        let what = format!("email identity {domain}");
        let signing = identity.dkim.as_ref().map(|dkim| {
            DkimSigningAttributes::builder()
                .domain_signing_selector(&dkim.selector)
                .domain_signing_private_key(&dkim.private_key)
                .build()
        });
        let made = self
            .client
            .create_email_identity()
            .email_identity(domain)
            .set_dkim_signing_attributes(signing.clone())
            .send()
            .await;
        let exists = made
            .as_ref()
            .err()
            .and_then(|e| e.as_service_error())
            .is_some_and(CreateEmailIdentityError::is_already_exists_exception);
        match (signing, exists) {
            (Some(signing), true) => {
                let switched = self
                    .client
                    .put_email_identity_dkim_signing_attributes()
                    .email_identity(domain)
                    .signing_attributes_origin(DkimSigningAttributesOrigin::External)
                    .signing_attributes(signing)
                    .send()
                    .await;
                settled(&what, switched, |_| false)?;
            }
            _ => settled(
                &what,
                made,
                CreateEmailIdentityError::is_already_exists_exception,
            )?,
        }
        match &identity.mail_from {
            Some(mail_from) => self.provision_mail_from(domain, mail_from).await,
            None => Ok(()),
        }
    }

    /// The domain's custom MAIL FROM domain. Until SES finds its MX record, SES sends with
    /// its own (`USE_DEFAULT_VALUE`): mail still goes out, only SPF does not align yet.
    async fn provision_mail_from(&self, domain: &str, mail_from: &str) -> Result<(), MailerError> {
        let set = self
            .client
            .put_email_identity_mail_from_attributes()
            .email_identity(domain)
            .mail_from_domain(mail_from)
            .behavior_on_mx_failure(BehaviorOnMxFailure::UseDefaultValue)
            .send()
            .await;
        match set {
            Err(err) if unsupported(&err) => {
                tracing::warn!(
                    domain,
                    "the SES endpoint has no custom MAIL FROM; SES sends with its own"
                );
                Ok(())
            }
            set => settled(&format!("the MAIL FROM domain of {domain}"), set, |_| false),
        }
    }

    /// The SES tenant, its configuration set's association and its reputation policy; its
    /// ARN (`None` when the endpoint has no tenants).
    async fn provision_ses_tenant(
        &self,
        tenant: &TenantId,
        configuration_set: &str,
        reputation: ReputationPolicy,
    ) -> Result<Option<String>, MailerError> {
        let what = format!("SES tenant {tenant}");
        let Some(tenant_arn) = self.tenant_arn(tenant, &what).await? else {
            return Ok(None);
        };
        let resource = format!("configuration-set/{configuration_set}");
        self.associate(tenant, &tenant_arn, &resource).await?;
        let policy = format!("reputation-policy/{}", reputation.as_str());
        let policy = ses_arn(&tenant_arn, Some("aws"), &policy).ok_or_else(|| {
            setup_failed(&what, format!("{tenant_arn:?} is not an SES tenant ARN"))
        })?;
        let updated = self
            .client
            .update_reputation_entity_policy()
            .reputation_entity_type(ReputationEntityType::Resource)
            .reputation_entity_reference(&tenant_arn)
            .reputation_entity_policy(policy)
            .send()
            .await;
        settled(&format!("{what}'s reputation policy"), updated, |_| false)?;
        Ok(Some(tenant_arn))
    }

    /// SES resource `resource` (`configuration-set/<name>`, `identity/<domain>`) of the
    /// tenant's account associated with its SES tenant.
    async fn associate(
        &self,
        tenant: &TenantId,
        tenant_arn: &str,
        resource: &str,
    ) -> Result<(), MailerError> {
        let what = format!("SES tenant {tenant}'s {resource}");
        let arn = ses_arn(tenant_arn, None, resource).ok_or_else(|| {
            setup_failed(&what, format!("{tenant_arn:?} is not an SES tenant ARN"))
        })?;
        let associated = self
            .client
            .create_tenant_resource_association()
            .tenant_name(tenant.as_str())
            .resource_arn(arn)
            .send()
            .await;
        settled(
            &what,
            associated,
            CreateTenantResourceAssociationError::is_already_exists_exception,
        )
    }

    /// The SES tenant's ARN, creating the tenant unless SES has it; `None` when the endpoint
    /// has no tenants at all.
    async fn tenant_arn(
        &self,
        tenant: &TenantId,
        what: &str,
    ) -> Result<Option<String>, MailerError> {
        let no_arn = || setup_failed(what, "SES gave no tenant ARN");
        match self
            .client
            .create_tenant()
            .tenant_name(tenant.as_str())
            .send()
            .await
        {
            Ok(made) => made.tenant_arn.map(Some).ok_or_else(no_arn),
            Err(err) if unsupported(&err) => {
                self.without_tenants();
                Ok(None)
            }
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(CreateTenantError::is_already_exists_exception) =>
            {
                let found = self
                    .client
                    .get_tenant()
                    .tenant_name(tenant.as_str())
                    .send()
                    .await
                    .map_err(|err| setup_failed(what, DisplayErrorContext(&err)))?;
                found
                    .tenant
                    .and_then(|t| t.tenant_arn)
                    .map(Some)
                    .ok_or_else(no_arn)
            }
            Err(err) => Err(setup_failed(what, DisplayErrorContext(&err))),
        }
    }

    /// Whose sending SES paused, when a send was refused as paused: `tenant`'s alone if the
    /// account may send and the tenant's own status says so, else (the account's, or
    /// unknown) the whole cell's, as `paused`.
    async fn whose_pause(&self, tenant: &TenantId, paused: MailerError) -> MailerError {
        if !matches!(self.account_sending().await, Ok(Sending::Enabled)) {
            return paused;
        }
        match self.sending(tenant).await {
            Ok(Sending::TenantPaused(reason)) => MailerError::TenantPaused { reason },
            _ => paused,
        }
    }

    fn request(&self, message: &Message) -> Result<SendEmailFluentBuilder, BuildError> {
        let mut request = self
            .client
            .send_email()
            .from_email_address(mailbox_text(&message.from))
            .destination(
                Destination::builder()
                    .set_to_addresses(addresses(&message.to))
                    .set_cc_addresses(addresses(&message.cc))
                    .set_bcc_addresses(addresses(&message.bcc))
                    .build(),
            )
            .set_reply_to_addresses(addresses(&message.reply_to))
            .content(content(message)?)
            .configuration_set_name(self.configuration_set(&message.tenant))
            .set_email_tags(Some(tags(message)?));
        if self.tenant_names() {
            request = request.tenant_name(message.tenant.as_str());
        }
        Ok(request)
    }
}

/// `None` for no mailboxes: SES takes an absent list, not an empty one.
fn addresses(mailboxes: &[Mailbox]) -> Option<Vec<String>> {
    (!mailboxes.is_empty()).then(|| mailboxes.iter().map(mailbox_text).collect())
}

fn content(message: &Message) -> Result<EmailContent, BuildError> {
    let text = |data: &str| Content::builder().data(data).charset(CHARSET).build();
    let part = |data: &str| (!data.is_empty()).then(|| text(data)).transpose();
    let body = Body::builder()
        .set_text(part(&message.text)?)
        .set_html(part(&message.html)?)
        .build();
    let headers = (message.headers.iter())
        .map(|(name, value)| MessageHeader::builder().name(name).value(value).build())
        .collect::<Result<Vec<_>, _>>()?;
    let simple = aws_sdk_sesv2::types::Message::builder()
        .subject(text(&message.subject)?)
        .body(body)
        .set_headers((!headers.is_empty()).then_some(headers))
        .build();
    Ok(EmailContent::builder().simple(simple).build())
}

/// cellmail's own tags (the names validation reserves), then the message's.
fn tags(message: &Message) -> Result<Vec<MessageTag>, BuildError> {
    let id = message.id.to_string();
    let own = [
        ("tenant_id", message.tenant.as_str()),
        ("message_class", message.class.as_str()),
        ("message_id", id.as_str()),
    ];
    own.into_iter()
        .chain(message.tags.iter().map(|(n, v)| (n.as_str(), v.as_str())))
        .map(|(name, value)| MessageTag::builder().name(name).value(value).build())
        .collect()
}

/// The ARN of SES resource `resource` (`configuration-set/<name>`, ...) in the partition and
/// region of `tenant_arn` (`arn:<partition>:ses:<region>:<account>:tenant/<name>/<id>`),
/// owned by `owner` (`None`: the tenant's account; `aws` owns SES's managed reputation
/// policies). SES names neither a configuration set's ARN nor a policy's in any answer, and
/// a tenant's association and reputation policy need them.
fn ses_arn(tenant_arn: &str, owner: Option<&str>, resource: &str) -> Option<String> {
    let mut parts = tenant_arn.splitn(6, ':');
    let (arn, partition, service, region, account, tenant) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    let owner = owner.unwrap_or(account);
    (arn == "arn" && service == "ses" && tenant.starts_with("tenant/"))
        .then(|| format!("arn:{partition}:ses:{region}:{owner}:{resource}"))
}

/// Provisioning is the cell's business, never the message's: whatever goes wrong, the
/// message stays queued and the next attempt provisions again.
fn setup_failed(what: &str, reason: impl std::fmt::Display) -> MailerError {
    MailerError::Retryable {
        reason: format!("provisioning {what}: {reason}"),
        retry_after: None,
    }
}

/// Whether a create or a delete left SES as asked: `already` says SES was so before (another
/// process made the resource first, or it was gone already).
fn settled<T, E>(
    what: &str,
    done: Result<T, SdkError<E, HttpResponse>>,
    already: fn(&E) -> bool,
) -> Result<(), MailerError>
where
    E: std::error::Error + 'static,
{
    match done {
        Ok(_) => Ok(()),
        Err(err) if err.as_service_error().is_some_and(already) => Ok(()),
        Err(err) => Err(setup_failed(what, DisplayErrorContext(&err))),
    }
}

/// Whether deleting a configuration set failed because it is gone already.
fn configuration_set_gone(err: &DeleteConfigurationSetError) -> bool {
    err.is_not_found_exception()
        // SES v1's code for it.
        || err.code() == Some("ConfigurationSetDoesNotExist")
}

/// Whether the endpoint does not implement the operation at all (an emulator): a 404, 405
/// or 501 that names no error, or AWS's code for an unknown operation.
pub(super) fn unsupported<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    let SdkError::ServiceError(service) = err else {
        return false;
    };
    match service.err().code() {
        Some(code) => code == "UnknownOperationException",
        None => matches!(service.raw().status().as_u16(), 404 | 405 | 501),
    }
}

/// SES's sending status of `what` could not be read.
fn status_unknown<E>(what: &str, err: &SdkError<E, HttpResponse>) -> MailerError
where
    E: std::error::Error + 'static,
{
    MailerError::Retryable {
        reason: format!(
            "reading the sending status of {what}: {}",
            DisplayErrorContext(err)
        ),
        retry_after: None,
    }
}

/// What an SES `SendEmail` error means for the message.
fn classify(err: &SdkError<SendEmailError, HttpResponse>) -> MailerError {
    let reason = DisplayErrorContext(err).to_string();
    match err.as_service_error() {
        Some(
            SendEmailError::AccountSuspendedException(_)
            | SendEmailError::SendingPausedException(_),
        ) => MailerError::Paused {
            reason,
            retry_after: SENDING_PAUSED_RETRY,
        },
        Some(
            SendEmailError::MessageRejected(_)
            | SendEmailError::MailFromDomainNotVerifiedException(_)
            | SendEmailError::NotFoundException(_)
            | SendEmailError::BadRequestException(_),
        ) => MailerError::Permanent { reason },
        // Throttling (TooManyRequests, LimitExceeded: the sending quota, or an untyped
        // throttling code), 5xx answers, timeouts, connection failures, and what SES does not
        // pin on the message (credentials, permissions): the message waits and is retried.
        _ => MailerError::Retryable {
            reason,
            retry_after: None,
        },
    }
}

#[async_trait]
impl Mailer for SesMailer {
    async fn send(&self, message: &Message) -> Result<(), MailerError> {
        // The tenant and its From domain were provisioned by the caller's `Mailer::prepare`.
        // One recipient's token was taken for the message's turn.
        let recipients = message.to.len() + message.cc.len() + message.bcc.len();
        self.rate
            .take(&self.client, recipients.saturating_sub(1))
            .await?;
        let request = self.request(message).map_err(|e| MailerError::Permanent {
            reason: format!("building the SES request: {e}"),
        })?;
        match request.send().await {
            Ok(sent) => {
                tracing::debug!(ses_message_id = sent.message_id(), "sent through SES");
                Ok(())
            }
            Err(err) => {
                let verdict = classify(&err);
                if matches!(
                    err.as_service_error(),
                    Some(SendEmailError::SendingPausedException(_))
                ) {
                    return Err(self.whose_pause(&message.tenant, verdict).await);
                }
                Err(verdict)
            }
        }
    }

    async fn prepare(&self, tenant: &TenantId, setup: &Setup) -> Result<(), MailerError> {
        self.provision(tenant, setup).await
    }

    /// A message's turn is its first recipient's token; the rest are taken by its send.
    async fn turn(&self) {
        if let Err(err) = self.rate.take(&self.client, 1).await {
            // The send finds it out too, and the message waits in the queue.
            tracing::debug!(%err, "no sending rate to wait for");
        }
    }

    async fn account_sending(&self) -> Result<Sending, MailerError> {
        match self.client.get_account().send().await {
            Ok(account) if !account.sending_enabled => Ok(Sending::AccountPaused(format!(
                "SES has the account's sending disabled (enforcement status {})",
                account.enforcement_status().unwrap_or("unknown")
            ))),
            Err(err) if !unsupported(&err) => Err(status_unknown("the account", &err)),
            _ => Ok(Sending::Enabled),
        }
    }

    /// The tenant's configuration set's and, with tenants on, its SES tenant's.
    async fn sending(&self, tenant: &TenantId) -> Result<Sending, MailerError> {
        let name = self.configuration_set(tenant);
        match self
            .client
            .get_configuration_set()
            .configuration_set_name(&name)
            .send()
            .await
        {
            Ok(set) if set.sending_options().is_some_and(|o| !o.sending_enabled) => {
                return Ok(Sending::TenantPaused(format!(
                    "SES has configuration set {name}'s sending disabled"
                )));
            }
            Err(err)
                if !unsupported(&err)
                    && !err
                        .as_service_error()
                        .is_some_and(GetConfigurationSetError::is_not_found_exception) =>
            {
                return Err(status_unknown(&name, &err));
            }
            _ => {}
        }
        if self.tenant_names() {
            let found = self
                .client
                .get_tenant()
                .tenant_name(tenant.as_str())
                .send()
                .await;
            match found {
                Ok(found)
                    if found.tenant().and_then(|t| t.sending_status())
                        == Some(&SendingStatus::Disabled) =>
                {
                    return Ok(Sending::TenantPaused(format!(
                        "SES tenant {tenant}'s sending status is DISABLED"
                    )));
                }
                Err(err)
                    if !unsupported(&err)
                        && !err
                            .as_service_error()
                            .is_some_and(GetTenantError::is_not_found_exception) =>
                {
                    return Err(status_unknown(&format!("SES tenant {tenant}"), &err));
                }
                _ => {}
            }
        }
        Ok(Sending::Enabled)
    }

    fn reconcile_every(&self) -> Option<Duration> {
        Some(Duration::from_secs(self.settings.reconcile_secs))
    }

    /// The identity's DKIM and MAIL FROM statuses (`NOT_STARTED` for what SES does not have).
    async fn identity_status(&self, domain: &str) -> Result<Option<IdentityStatus>, MailerError> {
        const NOT_STARTED: &str = "NOT_STARTED";
        let found = self
            .client
            .get_email_identity()
            .email_identity(domain)
            .send()
            .await;
        let found = match found {
            Ok(found) => found,
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(GetEmailIdentityError::is_not_found_exception) =>
            {
                return Ok(Some(IdentityStatus {
                    dkim: NOT_STARTED.into(),
                    mail_from: NOT_STARTED.into(),
                }));
            }
            Err(err) => return Err(status_unknown(&format!("email identity {domain}"), &err)),
        };
        let dkim =
            (found.dkim_attributes().and_then(|d| d.status())).map_or(NOT_STARTED, |s| s.as_str());
        let mail_from = (found.mail_from_attributes())
            .map_or(NOT_STARTED, |m| m.mail_from_domain_status().as_str());
        Ok(Some(IdentityStatus {
            dkim: dkim.to_owned(),
            mail_from: mail_from.to_owned(),
        }))
    }

    fn ses_region(&self) -> Option<String> {
        self.region.clone()
    }

    /// Deletes the tenant's SES tenant (with tenants on) and configuration set. Its domains'
    /// identities stay: deleting one would stop every sender of that domain on the account.
    async fn forget(&self, tenant: &TenantId) -> Result<(), MailerError> {
        self.provisioned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|provision, _| !provision.of(tenant));
        if self.tenant_names() {
            let what = format!("SES tenant {tenant} (deleting it)");
            let deleted = self
                .client
                .delete_tenant()
                .tenant_name(tenant.as_str())
                .send()
                .await;
            match deleted {
                Err(err) if unsupported(&err) => self.without_tenants(),
                deleted => settled(&what, deleted, DeleteTenantError::is_not_found_exception)?,
            }
        }
        let name = self.configuration_set(tenant);
        let deleted = self
            .client
            .delete_configuration_set()
            .configuration_set_name(&name)
            .send()
            .await;
        let what = format!("configuration set {name} (deleting it)");
        settled(&what, deleted, configuration_set_gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use aws_sdk_sesv2::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_sesv2::types::error::{
        AccountSuspendedException, BadRequestException, LimitExceededException,
        MailFromDomainNotVerifiedException, MessageRejected, NotFoundException,
        SendingPausedException, TooManyRequestsException,
    };
    use cellmail_proto::MessageClass;

    use crate::message::sample;
    use clap::Parser;

    fn status(code: u16) -> HttpResponse {
        HttpResponse::new(code.try_into().unwrap(), "".into())
    }

    fn service(err: SendEmailError, code: u16) -> SdkError<SendEmailError, HttpResponse> {
        SdkError::service_error(err, status(code))
    }

    fn untyped(code: &str, status_code: u16) -> SdkError<SendEmailError, HttpResponse> {
        service(
            SendEmailError::generic(ErrorMetadata::builder().code(code).build()),
            status_code,
        )
    }

    fn retry(after: Option<Duration>) -> impl Fn(&MailerError) -> bool {
        move |e| matches!(e, MailerError::Retryable { retry_after, .. } if *retry_after == after)
    }

    #[test]
    fn throttling_server_errors_and_transport_failures_are_retried() {
        let errors = [
            service(
                SendEmailError::TooManyRequestsException(
                    TooManyRequestsException::builder().build(),
                ),
                429,
            ),
            service(
                SendEmailError::LimitExceededException(
                    LimitExceededException::builder()
                        .message("Daily message quota exceeded")
                        .build(),
                ),
                400,
            ),
            untyped("Throttling", 400),
            untyped("InternalFailure", 500),
            SdkError::timeout_error("no answer in time"),
            SdkError::dispatch_failure(ConnectorError::io("connection refused".into())),
        ];
        for err in errors {
            let classified = classify(&err);
            assert!(retry(None)(&classified), "{err:?} -> {classified:?}");
        }
    }

    #[test]
    fn a_refused_message_is_permanent_with_the_reason() {
        let errors = [
            SendEmailError::MessageRejected(
                MessageRejected::builder()
                    .message("Email address is not verified")
                    .build(),
            ),
            SendEmailError::MailFromDomainNotVerifiedException(
                MailFromDomainNotVerifiedException::builder()
                    .message("Email address is not verified")
                    .build(),
            ),
            SendEmailError::NotFoundException(
                NotFoundException::builder()
                    .message("Email address is not verified")
                    .build(),
            ),
            SendEmailError::BadRequestException(
                BadRequestException::builder()
                    .message("Email address is not verified")
                    .build(),
            ),
        ];
        for err in errors {
            let classified = classify(&service(err, 400));
            assert!(
                matches!(&classified, MailerError::Permanent { reason } if reason.contains("not verified")),
                "{classified:?}"
            );
        }
    }

    #[test]
    fn a_paused_or_suspended_account_pauses_sending_for_a_minute() {
        let errors = [
            SendEmailError::AccountSuspendedException(AccountSuspendedException::builder().build()),
            SendEmailError::SendingPausedException(SendingPausedException::builder().build()),
        ];
        for err in errors {
            let classified = classify(&service(err, 400));
            assert!(
                matches!(classified, MailerError::Paused { retry_after, .. } if retry_after == SENDING_PAUSED_RETRY),
                "{classified:?}"
            );
        }
    }

    #[test]
    fn only_an_operation_the_endpoint_lacks_is_unsupported() {
        let bare_404 = SdkError::<CreateTenantError, _>::service_error(
            CreateTenantError::generic(ErrorMetadata::builder().build()),
            status(404),
        );
        assert!(unsupported(&bare_404));
        let unknown = SdkError::<CreateTenantError, _>::service_error(
            CreateTenantError::generic(
                ErrorMetadata::builder()
                    .code("UnknownOperationException")
                    .build(),
            ),
            status(400),
        );
        assert!(unsupported(&unknown));
        let missing = SdkError::<CreateTenantResourceAssociationError, _>::service_error(
            // As the SDK parses it: a modelled error carries its code.
            CreateTenantResourceAssociationError::NotFoundException(
                NotFoundException::builder()
                    .meta(ErrorMetadata::builder().code("NotFoundException").build())
                    .build(),
            ),
            status(404),
        );
        assert!(
            !unsupported(&missing),
            "a missing tenant is not a missing API"
        );
    }

    #[test]
    fn a_configuration_set_already_gone_counts_as_deleted_and_other_failures_do_not() {
        let not_found = DeleteConfigurationSetError::NotFoundException(
            NotFoundException::builder()
                .meta(ErrorMetadata::builder().code("NotFoundException").build())
                .build(),
        );
        let v1_code = DeleteConfigurationSetError::generic(
            ErrorMetadata::builder()
                .code("ConfigurationSetDoesNotExist")
                .build(),
        );
        let throttled = DeleteConfigurationSetError::generic(
            ErrorMetadata::builder()
                .code("TooManyRequestsException")
                .build(),
        );
        assert!(configuration_set_gone(&not_found));
        assert!(configuration_set_gone(&v1_code));
        assert!(!configuration_set_gone(&throttled));
        let failed =
            SdkError::<DeleteConfigurationSetError, _>::service_error(throttled, status(429));
        assert!(matches!(
            settled(
                "configuration set c",
                Err::<(), _>(failed),
                configuration_set_gone
            ),
            Err(MailerError::Retryable { .. })
        ));
        let gone =
            SdkError::<DeleteConfigurationSetError, _>::service_error(not_found, status(404));
        assert_eq!(
            settled(
                "configuration set c",
                Err::<(), _>(gone),
                configuration_set_gone
            ),
            Ok(())
        );
    }

    #[test]
    fn a_configuration_set_and_a_reputation_policy_arn_come_from_the_tenants_arn() {
        let tenant = "arn:aws:ses:eu-west-1:123456789012:tenant/acme/tn-1";
        let set = "configuration-set/cellmail-acme";
        assert_eq!(
            ses_arn(tenant, None, set).as_deref(),
            Some("arn:aws:ses:eu-west-1:123456789012:configuration-set/cellmail-acme")
        );
        assert_eq!(
            ses_arn(tenant, Some("aws"), "reputation-policy/strict").as_deref(),
            Some("arn:aws:ses:eu-west-1:aws:reputation-policy/strict")
        );
        assert_eq!(ses_arn("acme", None, set), None);
        assert_eq!(ses_arn("arn:aws:sqs:eu-west-1:1:tenant/x", None, set), None);
    }

    fn message() -> Message {
        let mut message = sample::message();
        message.tenant = TenantId::new("acme").unwrap();
        message.class = MessageClass::Marketing;
        message.from = sample::mailbox("news@acme.example");
        message.to = vec![sample::mailbox("jane@example.com")];
        message.subject = "Über news".into();
        message.text = "plain".into();
        message.tags = [("campaign".to_owned(), "fall".to_owned())].into();
        message
    }

    #[test]
    fn tags_are_cellmails_reserved_ones_then_the_messages() {
        let message = message();
        let tags: Vec<(String, String)> = tags(&message)
            .unwrap()
            .into_iter()
            .map(|t| (t.name, t.value))
            .collect();
        let names: Vec<&str> = tags.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(&names[..3], crate::validation::RESERVED_TAGS.as_slice());
        assert_eq!(
            tags,
            [
                ("tenant_id", "acme"),
                ("message_class", "marketing"),
                ("message_id", message.id.to_string().as_str()),
                ("campaign", "fall"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn content_is_utf8_with_only_the_parts_the_message_has() {
        let simple = content(&message()).unwrap().simple.unwrap();
        let subject = simple.subject.unwrap();
        assert_eq!(
            (subject.data.as_str(), subject.charset.as_deref()),
            ("Über news", Some("UTF-8"))
        );
        let body = simple.body.unwrap();
        assert_eq!(body.text.unwrap().data, "plain");
        assert!(body.html.is_none());
    }

    #[test]
    fn the_client_retries_nothing_and_every_call_has_a_timeout() {
        let config = SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .build();
        let mailer = SesMailer::new(&config, SesSettings::default(), None);
        let client = mailer.client.config();
        assert_eq!(
            client.retry_config().map(RetryConfig::max_attempts),
            Some(1)
        );
        let timeouts = client.timeout_config().unwrap();
        assert_eq!(timeouts.operation_timeout(), Some(CALL_TIMEOUT));
        assert_eq!(timeouts.connect_timeout(), Some(CONNECT_TIMEOUT));
    }

    #[test]
    fn settings_default_to_the_cellmail_prefix_without_tenants() {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            ses: SesSettings,
        }
        let parsed = Cli::try_parse_from(["cell"]).unwrap().ses;
        assert_eq!(parsed, SesSettings::default());
        assert_eq!(parsed.configuration_set_prefix, "cellmail-");
        let on = Cli::try_parse_from(["cell", "--ses-tenants"]).unwrap().ses;
        assert!(on.tenant_names);
    }
}
