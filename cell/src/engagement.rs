//! What a message carries so that its recipient's engagement comes back to its tenant: a
//! one-click unsubscribe (RFC 8058: `List-Unsubscribe` with a signed URL, and a `mailto:`
//! when configured, plus `List-Unsubscribe-Post`) on marketing mail and, when the tenant
//! asks, on transactional mail; and, for the classes the tenant tracks, an open pixel and
//! its html links rewritten through the tracking host. Every URL carries a token the
//! router verifies ([`cellmail_registry::tracking`]), naming the tenant, the message and
//! the recipient: a message has one when it has one envelope recipient, as bulk mail does;
//! one to several people gets no unsubscribe link, and its opens and clicks name none.
//!
//! Done as the message is handed to the transport, so what is queued stays as the tenant
//! sent it.

use std::borrow::Cow;

use cellmail_registry::tracking::{Action, Link, TrackingKeys};

use crate::message::Message;

/// Where engagement links point, from flags or env.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EngagementConfig {
    /// The public base URL of the routers' tracking host (`https://t.example.com`): open
    /// pixels, tracked links and unsubscribe URLs point there. Unset: mail carries none.
    #[arg(long = "tracking-base-url", env = "CELLMAIL_TRACKING_BASE_URL")]
    pub base_url: Option<String>,
    /// An address List-Unsubscribe also names (`mailto:`), for receivers that prefer mail.
    #[arg(long = "unsubscribe-mailto", env = "CELLMAIL_UNSUBSCRIBE_MAILTO")]
    pub mailto: Option<String>,
}

/// What a tenant's policy asks of one message's class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Asks {
    pub tracked: bool,
    pub unsubscribe: bool,
}

impl EngagementConfig {
    /// `message` as the transport gets it: with what `asks` asks for, signed by `keys`.
    pub fn decorate<'m>(
        &self,
        message: &'m Message,
        asks: Asks,
        keys: &TrackingKeys,
    ) -> Cow<'m, Message> {
        let Some(base) = self.base_url.as_deref().map(|b| b.trim_end_matches('/')) else {
            return Cow::Borrowed(message);
        };
        let mut recipients = message.recipients();
        let recipient = match (recipients.next(), recipients.next()) {
            (Some(only), None) => only.email.clone(),
            _ => String::new(),
        };
        let url = |path: &str, action: Action| {
            let link = Link {
                tenant: message.tenant.clone(),
                message_id: message.id.to_string(),
                recipient: recipient.clone(),
                action,
            };
            keys.sign(&link)
                .map(|token| format!("{base}/{path}/{token}"))
        };
        let mut decorated = message.clone();
        if asks.unsubscribe
            && !recipient.is_empty()
            && let Some(unsubscribe) = url("u", Action::Unsubscribe)
        {
            let mut targets = format!("<{unsubscribe}>");
            if let Some(mailto) = &self.mailto {
                targets.push_str(&format!(", <mailto:{mailto}?subject=unsubscribe>"));
            }
            decorated.headers.push(("List-Unsubscribe".into(), targets));
            decorated.headers.push((
                "List-Unsubscribe-Post".into(),
                "List-Unsubscribe=One-Click".into(),
            ));
        }
        if asks.tracked && !message.html.is_empty() {
            decorated.html = rewrite_links(&message.html, |target| {
                url("c", Action::Click(target.to_owned()))
            });
            if let Some(pixel) = url("o", Action::Open) {
                let img = format!(
                    r#"<img src="{pixel}" width="1" height="1" alt="" style="display:none">"#
                );
                match decorated.html.rfind("</body>") {
                    Some(at) => decorated.html.insert_str(at, &img),
                    None => decorated.html.push_str(&img),
                }
            }
        }
        Cow::Owned(decorated)
    }
}

/// `html` with each `href` to an http(s) URL replaced by what `track` makes of the URL
/// (entities such as `&amp;` decoded first); other links are left as they are.
fn rewrite_links(html: &str, track: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(html.len() + 256);
    let mut rest = html;
    while let Some(at) = find_ignore_case(rest, "href=") {
        let (before, after) = rest.split_at(at + "href=".len());
        out.push_str(before);
        let quote = after.chars().next().filter(|c| *c == '"' || *c == '\'');
        let Some(quote) = quote else {
            rest = after;
            continue;
        };
        let value = &after[1..];
        let Some(end) = value.find(quote) else {
            rest = after;
            continue;
        };
        let target = value[..end].trim().replace("&amp;", "&");
        let lower = target.to_ascii_lowercase();
        let tracked = (lower.starts_with("http://") || lower.starts_with("https://"))
            .then(|| track(&target))
            .flatten();
        out.push(quote);
        out.push_str(tracked.as_deref().unwrap_or(&value[..end]));
        out.push(quote);
        rest = &value[end + 1..];
    }
    out.push_str(rest);
    out
}

fn find_ignore_case(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellmail_proto::MessageClass;

    fn config() -> EngagementConfig {
        EngagementConfig {
            base_url: Some("https://t.example/".into()),
            mailto: Some("unsub@t.example".into()),
        }
    }

    #[test]
    fn marketing_mail_gets_one_click_unsubscribe_and_tracked_mail_its_links_rewritten() {
        let keys = TrackingKeys::default().rotated(1);
        let mut message = crate::message::sample::message();
        message.class = MessageClass::Marketing;
        message.html = r#"<body><a href="https://shop.example/x?a=1&amp;b=2">x</a> <a href='mailto:a@b'>m</a></body>"#.into();
        let asks = Asks {
            tracked: true,
            unsubscribe: true,
        };
        let decorated = config().decorate(&message, asks, &keys);
        let (name, value) = &decorated.headers[0];
        assert_eq!(name, "List-Unsubscribe");
        assert!(value.starts_with("<https://t.example/u/"), "{value}");
        assert!(value.ends_with(", <mailto:unsub@t.example?subject=unsubscribe>"));
        assert_eq!(
            decorated.headers[1],
            (
                "List-Unsubscribe-Post".into(),
                "List-Unsubscribe=One-Click".into()
            )
        );
        let token = value
            .trim_start_matches("<https://t.example/u/")
            .split('>')
            .next()
            .unwrap();
        let link = keys.verify(token).unwrap();
        assert_eq!(
            (link.recipient.as_str(), link.action),
            ("b@example.com", Action::Unsubscribe)
        );

        let html = &decorated.html;
        assert!(!html.contains("shop.example"), "{html}");
        assert!(html.contains("href='mailto:a@b'"), "other links stay");
        let click = html
            .split("https://t.example/c/")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(
            keys.verify(click).unwrap().action,
            Action::Click("https://shop.example/x?a=1&b=2".into())
        );
        assert!(html.contains(r#"width="1" height="1""#) && html.ends_with("</body>"));

        // Nothing asked, or nowhere to point: the message goes as it is.
        let plain = config().decorate(&message, Asks::default(), &keys);
        assert!(plain.headers.is_empty() && plain.html == message.html);
        let nowhere = EngagementConfig::default().decorate(&message, asks, &keys);
        assert!(matches!(nowhere, Cow::Borrowed(_)));
        // A message to several people names none of them: no unsubscribe link.
        message
            .cc
            .push(crate::message::sample::mailbox("c@example.com"));
        assert!(config().decorate(&message, asks, &keys).headers.is_empty());
    }
}
