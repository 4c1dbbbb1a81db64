//! What the API shows of a token.

/// Key prefixes the providers publish (they name the kind of key, not the key), longest first
/// where one begins another. A preview keeps the prefix, without its final separator.
const PUBLIC_PREFIXES: &[&str] = &[
    "sk-ant-",
    "sk-proj-",
    "sk-svcacct-",
    "sk-admin-",
    "sk-",
    "AIza",
    "gsk_",
    "ghu_",
    "gho_",
    "ghp_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "xai-",
];

/// What the API shows of a token: its public prefix when it has a known one, and the last 4
/// characters of the rest, fewer for a short token, so never more than a quarter of the part
/// that is secret (`sk-ant-api03-…wxyz` shows as `sk-ant…wxyz`).
pub fn token_preview(token: &str) -> String {
    let prefix = PUBLIC_PREFIXES
        .iter()
        .find(|p| token.starts_with(**p))
        .copied()
        .unwrap_or("");
    let rest: Vec<char> = token[prefix.len()..].chars().collect();
    let tail = (rest.len() / 4).min(4);
    let tail: String = rest[rest.len() - tail..].iter().collect();
    format!("{}…{tail}", prefix.trim_end_matches(['-', '_']))
}

/// The preview of a credential whose token does not open: nothing of it.
pub const PREVIEW_UNKNOWN: &str = "…";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_shows_little() {
        // Known public prefixes stay; of the rest, the last 4 characters at most, and never
        // more than a quarter of it.
        for (token, preview) in [
            (
                "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789wxyz",
                "sk-ant…wxyz",
            ),
            ("sk-proj-abcdefghijklmnopqrstuvwxyz0123", "sk-proj…0123"),
            ("sk-abcdefghijklmnopqrstuvwxyz0123", "sk…0123"),
            ("AIzaSyA-abcdefghijklmnopqrstuvwxyz0123", "AIza…0123"),
            ("gsk_abcdefghijklmnopqrstuvwxyz0123", "gsk…0123"),
            ("ghu_abcdefghijklmnop", "ghu…mnop"),
            ("gho_abcdefghijklmnop", "gho…mnop"),
            ("ghp_abcdefghijklmnop", "ghp…mnop"),
            ("github_pat_11ABCDEFG0123456789", "github_pat…6789"),
            ("xai-abcdefghijklmnop", "xai…mnop"),
            ("plainabcdefghijklmnop", "…mnop"),
            ("sk-ant-key1", "sk-ant…1"),
            ("sk-ant-", "sk-ant…"),
            ("abcdefgh", "…gh"),
            ("abcdefg", "…g"),
            ("abc", "…"),
            ("", "…"),
            ("ééééééééé", "…éé"),
        ] {
            assert_eq!(token_preview(token), preview, "{token}");
        }
        // Never more than a quarter of the secret part, whatever its length.
        for n in 0..64 {
            let token: String = std::iter::repeat_n('x', n).collect();
            let shown = token_preview(&token).chars().filter(|c| *c == 'x').count();
            assert!(shown * 4 <= n && shown <= 4, "{n}: {shown}");
        }
    }
}
