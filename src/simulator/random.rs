//! Random secrets in the shapes IMDS and STS use: session tokens, access key ids, secret keys.
//!
//! Everything comes from the OS (`getrandom`); characters are drawn by rejection sampling so
//! each one is uniform over its alphabet.

/// URL-safe base64 alphabet: what IMDSv2 tokens look like, and safe in a header.
const URL_SAFE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// Standard base64 alphabet, the one secret keys and session tokens use.
const BASE64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
/// Upper-case letters and digits, the alphabet of access key ids.
const UPPER_ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// Length of an IMDSv2 token; real ones are 56 characters.
const TOKEN_CHARS: usize = 56;
/// Random characters after the `ASIA` prefix of a temporary access key id.
const ACCESS_KEY_ID_RANDOM_CHARS: usize = 16;
/// Length of a secret access key.
const SECRET_ACCESS_KEY_CHARS: usize = 40;
/// Length of a session token; real ones run to about a kilobyte.
const SESSION_TOKEN_CHARS: usize = 1024;

/// A fresh IMDSv2 session token.
pub(super) fn token() -> Result<String, getrandom::Error> {
    chars_from(URL_SAFE, TOKEN_CHARS)
}

/// A fresh temporary access key id: `ASIA` marks STS-issued keys.
pub(super) fn access_key_id() -> Result<String, getrandom::Error> {
    Ok(format!(
        "ASIA{}",
        chars_from(UPPER_ALNUM, ACCESS_KEY_ID_RANDOM_CHARS)?
    ))
}

/// A fresh secret access key.
pub(super) fn secret_access_key() -> Result<String, getrandom::Error> {
    chars_from(BASE64, SECRET_ACCESS_KEY_CHARS)
}

/// A fresh session token.
pub(super) fn session_token() -> Result<String, getrandom::Error> {
    chars_from(BASE64, SESSION_TOKEN_CHARS)
}

/// `len` characters drawn uniformly from `alphabet` (ASCII, 1..=256 symbols).
fn chars_from(alphabet: &[u8], len: usize) -> Result<String, getrandom::Error> {
    let symbols = alphabet.len().clamp(1, 256);
    // Bytes at or above the largest multiple of `symbols` would favour the first symbols.
    let accept_below = 256 - 256 % symbols;
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf)?;
        for &byte in &buf {
            if out.len() == len {
                break;
            }
            if usize::from(byte) < accept_below {
                out.push(char::from(alphabet[usize::from(byte) % symbols]));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let token = token().expect("OS randomness");
        assert_eq!(token.len(), TOKEN_CHARS);
        assert!(token.bytes().all(|b| URL_SAFE.contains(&b)));

        let key = access_key_id().expect("OS randomness");
        assert_eq!(key.len(), 20);
        assert!(key.starts_with("ASIA"));
        assert!(key.bytes().all(|b| UPPER_ALNUM.contains(&b)));

        let secret = secret_access_key().expect("OS randomness");
        assert_eq!(secret.len(), 40);
        assert!(secret.bytes().all(|b| BASE64.contains(&b)));
    }

    #[test]
    fn every_symbol_can_appear() {
        let drawn = chars_from(UPPER_ALNUM, 4000).expect("OS randomness");
        for &symbol in UPPER_ALNUM {
            assert!(
                drawn.as_bytes().contains(&symbol),
                "{} never drawn",
                char::from(symbol)
            );
        }
    }
}
