//! `create_contact`: creates or updates a contact of the event's account,
//! keyed by msisdn and/or e-mail.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::options::{OptionSpec, Options, rendered_string};
use crate::records::contacts::{normalize_email, normalize_msisdn};
use crate::records::{ContactUpsert, Contacts, StepRef};
use crate::{Handler, StepError, StepInput, StepOutput};

/// `create_contact`.
///
/// Options: `msisdn` and/or `email` (at least one), `name`, `language`,
/// `fields` (a table of templates). Output: the contact (`key`, `msisdn`,
/// `email`, `name`, `language`, `fields`) and `created`.
#[derive(Debug, Clone)]
pub struct CreateContact {
    contacts: Arc<dyn Contacts>,
}

impl CreateContact {
    /// The handler over `contacts`.
    pub fn new(contacts: Arc<dyn Contacts>) -> Self {
        Self { contacts }
    }
}

fn literal(check: fn(&str) -> Result<String, String>) -> impl Fn(&str) -> Result<(), String> {
    move |s| check(s).map(|_| ())
}

#[async_trait::async_trait]
impl Handler for CreateContact {
    fn name(&self) -> &'static str {
        "create_contact"
    }

    /// A contact is a record the dispatcher keeps; the upsert names the
    /// step, so running it again for the same event changes nothing.
    fn effects(&self) -> crate::Effects {
        crate::Effects::LocalRepeatable
    }

    fn description(&self) -> &'static str {
        "Creates or updates a contact of the event's account, found by its msisdn or e-mail address."
    }

    fn output(&self) -> &'static str {
        "the contact (`key`, `msisdn`, `email`, `name`, `language`, `fields`, `created_at`, \
         `updated_at`) and `created`"
    }

    fn options(&self) -> Options {
        Options::of(vec![
            OptionSpec::text(
                "msisdn",
                "The contact's phone number (E.164, e.g. +27821234567).",
            )
            .literal(literal(normalize_msisdn)),
            OptionSpec::text(
                "email",
                "The contact's e-mail address (kept in lower case).",
            )
            .literal(literal(normalize_email)),
            OptionSpec::text("name", "The contact's name."),
            OptionSpec::text("language", "The contact's language (e.g. en, zu)."),
            OptionSpec::table(
                "fields",
                "Fields kept on the contact, merged into its earlier ones.",
            ),
        ])
        .one_of(&["msisdn", "email"], "to key the contact")
    }

    async fn handle(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let upsert = upsert_of(input)?;
        let (contact, created) = self
            .contacts
            .upsert(&input.event.account_key, upsert)
            .map_err(|e| StepError::retryable(format!("storing the contact: {e}"), None))?;
        Ok(contact_output(&contact, created))
    }

    /// The contact as the upsert would leave it, read but not written: the
    /// existing one with the same msisdn or e-mail updated, or a new one
    /// whose key is marked `simulated-`.
    async fn simulate(&self, input: &StepInput<'_>) -> Result<StepOutput, StepError> {
        let upsert = upsert_of(input)?;
        let account = &input.event.account_key;
        let read = |id: &Option<String>| match id {
            Some(id) => self
                .contacts
                .find(account, id)
                .map_err(|e| StepError::retryable(format!("reading the contact: {e}"), None)),
            None => Ok(None),
        };
        let existing = match read(&upsert.msisdn)? {
            Some(c) => Some(c),
            None => read(&upsert.email)?,
        };
        let now = switchboard_sdk::now();
        let created = existing.is_none();
        let mut contact = existing.unwrap_or_else(|| {
            let mut new = crate::records::Contact::new(account.clone(), now);
            new.key = format!("{}-{}", crate::SIMULATED, new.key);
            new
        });
        contact.apply(&upsert, now);
        Ok(contact_output(&contact, created))
    }
}

/// The step's output: the contact and whether it was created.
fn contact_output(contact: &crate::records::Contact, created: bool) -> StepOutput {
    let mut output = contact.without_account();
    output.insert("created".into(), Value::Bool(created));
    StepOutput::next(output)
}

/// What the step asks of the contacts, from its rendered config.
fn upsert_of(input: &StepInput<'_>) -> Result<ContactUpsert, StepError> {
    let config = input.render_config()?;
    let msisdn = rendered_string(&config, "msisdn")?
        .filter(|s| !s.is_empty())
        .map(|m| {
            normalize_msisdn(&m).map_err(|e| StepError::permanent(format!("config.msisdn: {e}")))
        })
        .transpose()?;
    let email = rendered_string(&config, "email")?
        .filter(|s| !s.is_empty())
        .map(|e| {
            normalize_email(&e).map_err(|e| StepError::permanent(format!("config.email: {e}")))
        })
        .transpose()?;
    if msisdn.is_none() && email.is_none() {
        return Err(StepError::permanent(
            "config.msisdn and config.email both rendered empty: nothing to key the contact by",
        ));
    }
    let fields = match config.get("fields") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            return Err(StepError::permanent(format!(
                "config.fields: must give a table, but gave {other}"
            )));
        }
    };
    Ok(ContactUpsert {
        msisdn,
        email,
        name: rendered_string(&config, "name")?,
        language: rendered_string(&config, "language")?,
        fields,
        by: Some(StepRef::of(
            &input.event.id.to_string(),
            input.chain,
            input.step_name(),
        )),
    })
}
