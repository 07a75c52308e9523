//! Tokens as `linkid token` makes and reads them: minting with the root
//! key, a token's revocation ids, and a readable description of its blocks.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use biscuit_auth::builder::{fact, string};
use biscuit_auth::builder_ext::BuilderExt;
use biscuit_auth::{Biscuit, KeyPair, PublicKey};

use super::{hex, Right};

/// What `linkid token mint` puts in a new token.
#[derive(Debug, Default, Clone)]
pub struct MintRequest {
    pub admin: bool,
    pub rights: Vec<Right>,
    pub user: Option<String>,
    pub ttl: Option<Duration>,
    /// Who the token is for: an authority fact `subject("…")`, which the
    /// change feed reports.
    pub subject: Option<String>,
}

/// Mints a token signed by the root key.
pub fn mint(keypair: &KeyPair, request: &MintRequest) -> anyhow::Result<String> {
    if !request.admin && request.rights.is_empty() {
        bail!("a token needs --admin or at least one --right");
    }
    let mut builder = Biscuit::builder();
    if request.admin {
        builder = builder.fact(fact("role", &[string("admin")]))?;
    }
    for right in &request.rights {
        builder = builder.fact(fact("right", &[string(right.as_str())]))?;
    }
    if let Some(subject) = &request.subject {
        crate::domain::check_text(subject).map_err(|why| anyhow::anyhow!("--subject {why}"))?;
        builder = builder.fact(fact("subject", &[string(subject)]))?;
    }
    if let Some(user) = &request.user {
        // The authorizer's user fact is the id in NFC: so is the token's.
        let user = crate::domain::UserId::parse(user)
            .map_err(|why| anyhow::anyhow!("--user {why}"))?
            .into_inner();
        // Listing the providers names no user, and a user's own token needs it.
        builder = builder.code_with_params(
            r#"check if user({user}) or operation("identity_providers:list");"#,
            HashMap::from([("user".to_string(), string(&user))]),
            HashMap::new(),
        )?;
    }
    if let Some(ttl) = request.ttl {
        builder = builder.check_expiration_date(SystemTime::now() + ttl);
    }
    Ok(builder.build(keypair)?.to_base64()?)
}

/// A token's revocation ids (hex), verified against the root key.
pub fn revocation_ids(root: PublicKey, token: &str) -> anyhow::Result<Vec<String>> {
    let token = Biscuit::from_base64(token.trim(), root)
        .context("the token is malformed or not signed by this root key")?;
    Ok(token.revocation_identifiers().iter().map(hex).collect())
}

/// A readable description of a token: its blocks and revocation ids.
pub fn inspect(root: PublicKey, token: &str) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let token = token.trim();
    let (verified, blocks, ids) = match Biscuit::from_base64(token, root) {
        Ok(t) => {
            let blocks: Vec<String> = (0..t.block_count())
                .map(|i| t.print_block_source(i).unwrap_or_default())
                .collect();
            (true, blocks, t.revocation_identifiers())
        }
        Err(_) => {
            let t = biscuit_auth::UnverifiedBiscuit::from_base64(token)
                .context("the token is not a biscuit")?;
            let blocks: Vec<String> = (0..t.block_count())
                .map(|i| t.print_block_source(i).unwrap_or_default())
                .collect();
            (false, blocks, t.revocation_identifiers())
        }
    };
    let mut out = String::new();
    writeln!(
        out,
        "signature: {}",
        if verified {
            "valid for this server's root key"
        } else {
            "NOT valid for this server's root key"
        }
    )?;
    for (i, (source, id)) in blocks.iter().zip(&ids).enumerate() {
        writeln!(out, "block {i}:")?;
        writeln!(out, "  revocation id: {}", hex(id))?;
        for line in source.lines().filter(|l| !l.trim().is_empty()) {
            writeln!(out, "  {}", line.trim())?;
        }
    }
    Ok(out)
}
