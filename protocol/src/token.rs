//! Login tokens: JWT (RFC 7519) signed with HS256, with the claims of the contract.
//!
//! Claims: `sub` (account id, decimal string), `kind` (`buyer`|`wechat`|`agent`|`service`),
//! `shop` (decimal string; required for `agent`), `exp` (Unix seconds). The gateway verifies,
//! `chinwag token` and the load generator mint. The clock comes from the caller.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::ids::{parse_decimal_u64, ShopId, Uid, UidKind};

type HmacSha256 = Hmac<Sha256>;

/// What a valid token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// The user (`kind` and `sub`).
    pub uid: Uid,
    /// The shop an agent works for (required for agents).
    pub shop: Option<ShopId>,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

/// Why a token was refused. The gateway answers every one with `unauthorized`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts of JSON.
    Malformed,
    /// The header names an algorithm other than HS256.
    BadAlgorithm,
    /// The signature does not match the secret.
    BadSignature,
    /// `exp` is not in the future.
    Expired,
    /// A claim is missing or malformed.
    BadClaim(&'static str),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed => f.write_str("token is not a JWT"),
            TokenError::BadAlgorithm => f.write_str("token algorithm is not HS256"),
            TokenError::BadSignature => f.write_str("token signature does not match"),
            TokenError::Expired => f.write_str("token has expired"),
            TokenError::BadClaim(claim) => write!(f, "token claim {claim} is missing or bad"),
        }
    }
}

impl std::error::Error for TokenError {}

const HEADER_B64: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"; // {"alg":"HS256","typ":"JWT"}

/// Signs `claims` with `secret`.
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    let mut payload = format!(
        "{{\"sub\":\"{}\",\"kind\":\"{}\"",
        claims.uid.id,
        claims.uid.kind.as_str()
    );
    if let Some(shop) = claims.shop {
        payload.push_str(&format!(",\"shop\":\"{shop}\""));
    }
    payload.push_str(&format!(",\"exp\":{}}}", claims.exp));
    let mut token = format!("{HEADER_B64}.{}", URL_SAFE_NO_PAD.encode(payload));
    let signature = mac(secret, token.as_bytes()).finalize().into_bytes();
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature));
    token
}

fn mac(secret: &[u8], signed: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(signed);
    mac
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
}

#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    kind: Option<String>,
    shop: Option<String>,
    exp: Option<u64>,
}

/// Checks `token`'s signature with `secret` and its claims at `now_unix_s`.
pub fn verify(secret: &[u8], token: &str, now_unix_s: u64) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header: RawHeader = decode_part(header)?;
    if header.alg != "HS256" {
        return Err(TokenError::BadAlgorithm);
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::Malformed)?;
    let signed_len = token.len() - signature_len(token);
    mac(secret, &token.as_bytes()[..signed_len])
        .verify_slice(&signature)
        .map_err(|_| TokenError::BadSignature)?;
    let claims: RawClaims = decode_part(payload)?;
    let id = claims
        .sub
        .and_then(|s| parse_decimal_u64(&s).ok())
        .ok_or(TokenError::BadClaim("sub"))?;
    let kind: UidKind = claims
        .kind
        .and_then(|k| k.parse().ok())
        .ok_or(TokenError::BadClaim("kind"))?;
    let shop = match claims.shop {
        None => None,
        Some(shop) => Some(
            shop.parse::<ShopId>()
                .map_err(|_| TokenError::BadClaim("shop"))?,
        ),
    };
    if kind == UidKind::Agent && shop.is_none() {
        return Err(TokenError::BadClaim("shop"));
    }
    let exp = claims.exp.ok_or(TokenError::BadClaim("exp"))?;
    if exp <= now_unix_s {
        return Err(TokenError::Expired);
    }
    Ok(Claims {
        uid: Uid::new(kind, id),
        shop,
        exp,
    })
}

/// The length of the signature part and its dot.
fn signature_len(token: &str) -> usize {
    token.rfind('.').map_or(0, |dot| token.len() - dot)
}

fn decode_part<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, TokenError> {
    let json = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";
    const NOW: u64 = 1_800_000_000;

    fn agent() -> Claims {
        Claims {
            uid: Uid::new(UidKind::Agent, 7),
            shop: Some(ShopId(42)),
            exp: NOW + 60,
        }
    }

    #[test]
    fn minted_tokens_verify() {
        let token = mint(SECRET, &agent());
        assert_eq!(verify(SECRET, &token, NOW), Ok(agent()));
        let buyer = Claims {
            uid: Uid::new(UidKind::Buyer, 1001),
            shop: None,
            exp: NOW + 1,
        };
        assert_eq!(verify(SECRET, &mint(SECRET, &buyer), NOW), Ok(buyer));
    }

    #[test]
    fn rejects_wrong_secret_expired_and_tampered_tokens() {
        let token = mint(SECRET, &agent());
        assert_eq!(verify(b"other", &token, NOW), Err(TokenError::BadSignature));
        assert_eq!(verify(SECRET, &token, NOW + 60), Err(TokenError::Expired));
        // Swap in a payload naming another user, keeping the signature.
        let forged_payload = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"sub":"8","kind":"agent","shop":"42","exp":{}}}"#,
            NOW + 60
        ));
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(verify(SECRET, &forged, NOW), Err(TokenError::BadSignature));
        assert_eq!(verify(SECRET, "a.b", NOW), Err(TokenError::Malformed));
        assert_eq!(verify(SECRET, "", NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn rejects_alg_none_and_missing_claims() {
        let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        let payload = URL_SAFE_NO_PAD.encode(r#"{"sub":"1","kind":"buyer","exp":9999999999}"#);
        assert_eq!(
            verify(SECRET, &format!("{none_header}.{payload}."), NOW),
            Err(TokenError::BadAlgorithm)
        );
        let signed = |payload: &str| {
            let unsigned = format!("{HEADER_B64}.{}", URL_SAFE_NO_PAD.encode(payload));
            let sig = mac(SECRET, unsigned.as_bytes()).finalize().into_bytes();
            format!("{unsigned}.{}", URL_SAFE_NO_PAD.encode(sig))
        };
        let cases = [
            (r#"{"kind":"buyer","exp":9999999999}"#, "sub"),
            (r#"{"sub":"x1","kind":"buyer","exp":9999999999}"#, "sub"),
            (r#"{"sub":"1","exp":9999999999}"#, "kind"),
            (r#"{"sub":"1","kind":"admin","exp":9999999999}"#, "kind"),
            (r#"{"sub":"1","kind":"agent","exp":9999999999}"#, "shop"),
            (r#"{"sub":"1","kind":"buyer"}"#, "exp"),
        ];
        for (payload, claim) in cases {
            assert_eq!(
                verify(SECRET, &signed(payload), NOW),
                Err(TokenError::BadClaim(claim)),
                "{payload}"
            );
        }
    }
}
