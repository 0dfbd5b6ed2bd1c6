//! Preferences: whether a person may be sent messages, per address and
//! channel, and per topic — the channel as a whole, a template, or a
//! template's category.
//!
//! Preferences are kept by address (an e-mail address, an E.164 number),
//! not by contact: an unsubscribe, a spam report, a bounce or a STOP comes
//! for an address, and must hold for every send to it, a contact's or not.
//! A contact's preferences are those of its addresses. Nothing said means
//! subscribed; an opt-out at any level that applies to a send suppresses
//! it (the channel, the template's category, the template), and an opt-in
//! undoes only the opt-out of its own level.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

use super::{Channel, RecordError};

/// What a choice is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Topic {
    /// Everything sent on the channel.
    All,
    /// The messages of one template (by slug).
    Template(String),
    /// The messages of every template of a category.
    Category(String),
}

impl Topic {
    /// Reads `all`, `template:SLUG` or `category:NAME`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let topic = match s.split_once(':') {
            None if s == "all" => Topic::All,
            Some(("template", slug)) if !slug.is_empty() => Topic::Template(slug.to_string()),
            Some(("category", name)) if !name.is_empty() => Topic::Category(name.to_string()),
            _ => {
                return Err(format!(
                    "{s:?} is not a topic: use all, template:SLUG or category:NAME"
                ));
            }
        };
        Ok(topic)
    }

    /// The topics a message of `template` (slug, category) falls under,
    /// the broadest first.
    pub fn of(template: Option<(&str, Option<&str>)>) -> Vec<Topic> {
        let mut topics = vec![Topic::All];
        if let Some((slug, category)) = template {
            if let Some(category) = category {
                topics.push(Topic::Category(category.to_string()));
            }
            topics.push(Topic::Template(slug.to_string()));
        }
        topics
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::All => f.write_str("all"),
            Topic::Template(slug) => write!(f, "template:{slug}"),
            Topic::Category(name) => write!(f, "category:{name}"),
        }
    }
}

/// A person's choice about one topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Whether they may be sent it.
    pub subscribed: bool,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// How, in words (a one-click unsubscribe, SendGrid's `spamreport`, an
    /// operator's `preferences set`).
    pub cause: String,
    /// What made it (the provider's event, the message unsubscribed from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// The preferences of one address on one channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddressPreferences {
    /// The account.
    pub account_key: AccountKey,
    /// The channel.
    pub channel: Channel,
    /// The address (normalised: lower-case e-mail, E.164).
    pub address: String,
    /// The choices made, by topic (`all`, `template:SLUG`, `category:NAME`).
    pub topics: BTreeMap<String, Choice>,
}

impl AddressPreferences {
    /// No choice made yet: subscribed to everything.
    pub fn new(account_key: AccountKey, channel: Channel, address: String) -> Self {
        Self {
            account_key,
            channel,
            address,
            topics: BTreeMap::new(),
        }
    }

    /// Why a message of `template` (slug, category) is not to be sent to
    /// this address, if it is not: the broadest opt-out that applies.
    pub fn suppression(&self, template: Option<(&str, Option<&str>)>) -> Option<String> {
        Topic::of(template).into_iter().find_map(|topic| {
            let choice = self.topics.get(&topic.to_string())?;
            (!choice.subscribed).then(|| {
                let what = match &topic {
                    Topic::All => format!("all {}", self.channel.as_str()),
                    Topic::Template(slug) => format!("template {slug:?}"),
                    Topic::Category(name) => format!("category {name:?}"),
                };
                format!(
                    "{} opted out of {what} on {} ({})",
                    self.address,
                    switchboard_sdk::format_rfc3339(choice.at),
                    choice.cause
                )
            })
        })
    }

    /// Records `choice` about `topic`; whether it changed anything. The
    /// same choice again does not, nor a choice made before the one it has
    /// (a provider's event posted again, or late, after the person or the
    /// account chose otherwise).
    pub fn choose(&mut self, topic: &Topic, choice: Choice) -> bool {
        let key = topic.to_string();
        match self.topics.get(&key) {
            Some(current) if current.subscribed == choice.subscribed || current.at > choice.at => {
                false
            }
            _ => {
                self.topics.insert(key, choice);
                true
            }
        }
    }
}

/// Preferences of every account.
pub trait Preferences: Send + Sync + std::fmt::Debug {
    /// The preferences of `address` on `channel`; `None` when none were
    /// ever recorded (subscribed to everything).
    fn get(
        &self,
        account: &AccountKey,
        channel: Channel,
        address: &str,
    ) -> Result<Option<AddressPreferences>, RecordError>;

    /// Records `choice` about `topic` for the address `at` (channel,
    /// address) ([`AddressPreferences::choose`]); the preferences after.
    fn choose(
        &self,
        account: &AccountKey,
        at: (Channel, &str),
        topic: &Topic,
        choice: Choice,
    ) -> Result<AddressPreferences, RecordError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(subscribed: bool, cause: &str) -> Choice {
        Choice {
            subscribed,
            at: time::macros::datetime!(2026-12-04 17:00:00 UTC),
            cause: cause.into(),
            source: None,
        }
    }

    fn preferences(choices: &[(&str, bool)]) -> AddressPreferences {
        let mut p = AddressPreferences::new(
            AccountKey::new("acme").unwrap(),
            Channel::Email,
            "ann@example.org".into(),
        );
        for (topic, subscribed) in choices {
            p.choose(&Topic::parse(topic).unwrap(), choice(*subscribed, "test"));
        }
        p
    }

    /// Whether a message of `template` is suppressed for an address with
    /// `choices`, and at which level.
    fn check(
        choices: &[(&str, bool)],
        template: Option<(&str, Option<&str>)>,
        expected: Option<&str>,
    ) {
        let reason = preferences(choices).suppression(template);
        match expected {
            None => assert_eq!(reason, None, "{choices:?} {template:?}"),
            Some(what) => {
                let reason = reason.unwrap_or_else(|| panic!("{choices:?} {template:?}"));
                assert!(
                    reason.contains(&format!("opted out of {what} ")),
                    "{reason}"
                );
            }
        }
    }

    #[test]
    fn an_opt_out_at_any_level_that_applies_suppresses() {
        let welcome = Some(("welcome", Some("onboarding")));
        check(&[], welcome, None);
        check(&[], None, None);
        check(&[("all", false)], welcome, Some("all email"));
        check(&[("all", false)], None, Some("all email"));
        check(
            &[("category:onboarding", false)],
            welcome,
            Some("category \"onboarding\""),
        );
        check(
            &[("template:welcome", false)],
            welcome,
            Some("template \"welcome\""),
        );
        // Another template's, another category's: not this one.
        check(&[("template:receipt", false)], welcome, None);
        check(&[("category:marketing", false)], welcome, None);
        check(&[("template:welcome", false)], None, None);
        // An opt-in undoes only the opt-out of its own level.
        check(
            &[("all", false), ("template:welcome", true)],
            welcome,
            Some("all email"),
        );
        check(&[("all", false), ("all", true)], welcome, None);
        check(
            &[("category:onboarding", false), ("all", true)],
            welcome,
            Some("category \"onboarding\""),
        );
    }

    #[test]
    fn topics_read_as_they_are_written() {
        for s in ["all", "template:welcome", "category:news"] {
            assert_eq!(Topic::parse(s).unwrap().to_string(), s);
        }
        for s in ["", "none", "template:", "category:", "slug:welcome"] {
            assert!(Topic::parse(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn the_same_choice_again_or_an_older_one_changes_nothing() {
        let mut p = preferences(&[("all", false)]);
        assert!(!p.choose(&Topic::All, choice(false, "again")));
        assert_eq!(p.topics["all"].cause, "test");
        assert!(p.choose(&Topic::All, choice(true, "resubscribed")));
        assert!(p.topics["all"].subscribed);
        // An unsubscribe made before that resubscribe, posted late.
        let late = Choice {
            at: time::macros::datetime!(2026-12-04 16:00:00 UTC),
            ..choice(false, "sendgrid unsubscribe, posted again")
        };
        assert!(!p.choose(&Topic::All, late));
        assert!(p.topics["all"].subscribed);
    }
}
