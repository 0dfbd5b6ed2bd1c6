//! `switchboard secrets …` and `switchboard tokens …`: an account's secrets
//! (write-only) and the tokens that reach its API.

use switchboard_api::records::{SecretList, SecretRemoved, SecretSet};
use switchboard_api::tokens::{CreatedToken, NewTokenRequest, RevokedToken, TokenList};

use super::*;

/// `switchboard secrets set ACCOUNT NAME`: the value from `--value`, or stdin.
pub async fn secrets_set(
    client: &Client,
    account_raw: &str,
    name: &str,
    value: Option<String>,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let value = match value {
        Some(v) => v,
        None => {
            let mut v = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut v)
                .map_err(|e| input(format!("reading the secret from stdin: {e}")))?;
            v
        }
    };
    let answer: SecretSet = client
        .put_text(&paths::secret(a.as_str(), name), value, "text/plain")
        .await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!("secret {name:?} of account {a} set"))
}

/// `switchboard secrets list ACCOUNT`: names only; values are never read back.
pub async fn secrets_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: SecretList = client.get(&paths::secrets(a.as_str())).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let empty = format!("account {a} has no secrets");
    Ok(rows(&answer.secrets, None, empty, String::clone))
}

/// `switchboard secrets rm ACCOUNT NAME`
pub async fn secrets_rm(
    client: &Client,
    account_raw: &str,
    name: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: SecretRemoved = client.delete(&paths::secret(a.as_str(), name)).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!("secret {name:?} of account {a} removed"))
}

/// `switchboard tokens create ACCOUNT [--name N]`: the token is printed this
/// once; the dispatcher keeps only its hash.
pub async fn tokens_create(
    client: &Client,
    account_raw: &str,
    name: Option<&str>,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let body = NewTokenRequest {
        name: name.map(str::to_string),
    };
    let answer: CreatedToken = client.post(&paths::tokens(a.as_str()), &body).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let token = &answer.token;
    let named = answer
        .name
        .as_ref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    Ok(format!(
        "created token {}{named} for account {a}; it reaches account {a} only:\n{token}\n\
         This is the only time it is shown: store it now (the dispatcher keeps only its hash).\n\
         Use it: export SWITCHBOARD_TOKEN={token}",
        answer.id,
    ))
}

/// `switchboard tokens list ACCOUNT`: ids, names and creation times.
pub async fn tokens_list(
    client: &Client,
    account_raw: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: TokenList = client.get(&paths::tokens(a.as_str())).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    let header = format!("{:<36}  {:<28} name", "id", "created at");
    let empty = format!("account {a} has no tokens");
    Ok(rows(&answer.tokens, Some(header), empty, |t| {
        format!(
            "{:<36}  {:<28} {}",
            t.id,
            format_rfc3339(t.created_at),
            t.name.as_deref().unwrap_or("-"),
        )
    }))
}

/// `switchboard tokens revoke ACCOUNT ID`
pub async fn tokens_revoke(
    client: &Client,
    account_raw: &str,
    id: &str,
    json_out: bool,
) -> Result<String, CliError> {
    let a = account(account_raw)?;
    let answer: RevokedToken = client.delete(&paths::token(a.as_str(), id)).await?;
    if json_out {
        return Ok(pretty(&answer));
    }
    Ok(format!(
        "revoked token {id} of account {a}: requests with it are refused from now on"
    ))
}
