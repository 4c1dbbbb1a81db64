//! The management key's argon2id hash: making one, the policy a configured one must pass,
//! and checking a presented key against it.

/// The cost of an argon2id hash: memory in KiB, passes, lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhcParams {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

/// What `hash-secret` uses: RFC 9106's second recommended option (64 MiB, 3 passes, 4 lanes),
/// for machines without the 2 GiB its first option takes; with a 16-byte salt and 32-byte tag.
pub const HASH_PARAMS: PhcParams = PhcParams {
    m_kib: 65_536,
    t: 3,
    p: 4,
};

/// OWASP's argon2id minimums: each (memory KiB, passes) pair costs an attacker about as much as
/// the others. A key is accepted if it reaches at least one of them.
pub const OWASP_MINIMUMS: [(u32, u32); 5] = [
    (47_104, 1),
    (19_456, 2),
    (12_288, 3),
    (9_216, 4),
    (7_168, 5),
];
/// The most a configured hash may ask per check: each check in flight holds `m` of memory, so
/// the string in the config must not be able to ask for any amount.
pub const PHC_MAX: PhcParams = PhcParams {
    m_kib: 262_144,
    t: 16,
    p: 16,
};
/// Tag lengths accepted, in bytes: shorter ones make a lucky guess likelier than the key's own
/// strength; the PHC format stores at most 64.
const PHC_TAG_BYTES: std::ops::RangeInclusive<usize> = 16..=64;

/// Whether a configured management key is meant as an argon2 PHC string (and so must pass
/// [`check_phc`]) rather than plain text.
pub fn is_phc(s: &str) -> bool {
    s.starts_with("$argon2")
}

/// The argon2id PHC string of `secret` with [`HASH_PARAMS`] (what `cliproxyapi hash-secret`
/// prints). CPU- and memory-heavy: call it off the async runtime.
pub fn hash_secret(secret: &str) -> Result<String, String> {
    hash_secret_with(secret, HASH_PARAMS)
}

/// The argon2id (version 19) PHC string of `secret` with the given cost and a random 16-byte
/// salt.
pub fn hash_secret_with(secret: &str, cost: PhcParams) -> Result<String, String> {
    use argon2::password_hash::PasswordHasher;
    let params =
        argon2::Params::new(cost.m_kib, cost.t, cost.p, Some(32)).map_err(|e| e.to_string())?;
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(secret.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Check `phc` against the policy: argon2id, version 19 written out, a salt and a tag of
/// 16 to 64 bytes, at least one of [`OWASP_MINIMUMS`], nothing above [`PHC_MAX`]. Returns
/// its cost.
pub fn check_phc(phc: &str) -> Result<PhcParams, String> {
    let hash = argon2::password_hash::phc::PasswordHash::new(phc)
        .map_err(|e| format!("not a valid argon2 PHC string ({e})"))?;
    let variant = hash.algorithm.as_str();
    if variant != "argon2id" {
        return Err(format!(
            "{variant} is not accepted, only argon2id (`cliproxyapi hash-secret` makes one)"
        ));
    }
    match hash.version {
        Some(19) => {}
        Some(v) => return Err(format!("argon2 version {v} is not accepted, only v=19")),
        None => return Err("the PHC string names no version; only v=19 is accepted".into()),
    }
    let param = |name: &'static str| {
        hash.params
            .get_decimal(name)
            .ok_or_else(|| format!("the PHC string gives no `{name}`; m, t and p are needed"))
    };
    let cost = PhcParams {
        m_kib: param("m")?,
        t: param("t")?,
        p: param("p")?,
    };
    let PhcParams { m_kib, t, p } = cost;
    if m_kib > PHC_MAX.m_kib || t > PHC_MAX.t || p > PHC_MAX.p {
        return Err(format!(
            "m={m_kib},t={t},p={p} is above the accepted maximum of m={},t={},p={}",
            PHC_MAX.m_kib, PHC_MAX.t, PHC_MAX.p
        ));
    }
    argon2::Params::try_from(&hash).map_err(|e| format!("invalid argon2 parameters ({e})"))?;
    if hash.salt.is_none() {
        return Err("the PHC string has no salt".into());
    }
    match &hash.hash {
        Some(tag) if PHC_TAG_BYTES.contains(&tag.len()) => {}
        Some(tag) => {
            return Err(format!(
                "a {}-byte hash is not accepted; 16 to 64 bytes",
                tag.len()
            ));
        }
        None => return Err("the PHC string has no hash".into()),
    }
    if !OWASP_MINIMUMS.iter().any(|&(m, tt)| m_kib >= m && t >= tt) {
        return Err(format!(
            "m={m_kib},t={t} is below OWASP's minimum for argon2id (m=19456,t=2, or m=47104,t=1, m=12288,t=3, m=9216,t=4, m=7168,t=5)"
        ));
    }
    Ok(cost)
}

/// Does `presented` match the PHC string? Uses the parameters inside the string, once it has
/// passed [`check_phc`]. CPU- and memory-heavy: call it off the async runtime.
pub fn verify_secret(phc: &str, presented: &str) -> bool {
    use argon2::password_hash::PasswordVerifier;
    if check_phc(phc).is_err() {
        return false;
    }
    argon2::Argon2::default()
        .verify_password(presented.as_bytes(), phc)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_hash_and_verify() {
        let phc = hash_secret("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=65536,t=3,p=4$"), "{phc}");
        assert!(is_phc(&phc));
        assert_eq!(check_phc(&phc).unwrap(), HASH_PARAMS);
        let parsed = argon2::password_hash::phc::PasswordHash::new(&phc).unwrap();
        assert_eq!(parsed.salt.unwrap().as_ref().len(), 16);
        assert_eq!(parsed.hash.unwrap().len(), 32);
        assert!(verify_secret(&phc, "correct horse"));
        assert!(!verify_secret(&phc, "correct horsf"));
        assert!(!verify_secret(&phc, ""));
        assert!(check_phc("$argon2id$nonsense").is_err());
    }

    /// A PHC string with the given head, and a real salt and tag (made once).
    fn phc_of(head: &str) -> String {
        static REAL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let real = REAL.get_or_init(|| {
            let cost = PhcParams {
                m_kib: 7_168,
                t: 5,
                p: 1,
            };
            hash_secret_with("k", cost).unwrap()
        });
        let tail: Vec<&str> = real.rsplitn(3, '$').collect();
        format!("{head}${}${}", tail[1], tail[0])
    }

    #[test]
    fn phc_policy_refuses_weak_odd_and_huge_hashes() {
        let refused = [
            // Other variants and versions, whatever their cost.
            ("$argon2i$v=19$m=65536,t=3,p=4", "argon2i is not accepted"),
            ("$argon2d$v=19$m=65536,t=3,p=4", "argon2d is not accepted"),
            ("$argon2$v=19$m=65536,t=3,p=4", "argon2 is not accepted"),
            ("$argon2ix$v=19$m=65536,t=3,p=4", "not accepted"),
            ("$argon2id$v=16$m=65536,t=3,p=4", "version 16"),
            ("$argon2id$v=0$m=65536,t=3,p=4", "version 0"),
            (
                "$argon2id$v=4294967295$m=65536,t=3,p=4",
                "version 4294967295",
            ),
            ("$argon2id$m=65536,t=3,p=4", "no version"),
            // Below every OWASP pair.
            ("$argon2id$v=19$m=8,t=1,p=1", "below OWASP"),
            ("$argon2id$v=19$m=19455,t=2,p=1", "below OWASP"),
            ("$argon2id$v=19$m=47103,t=1,p=1", "below OWASP"),
            ("$argon2id$v=19$m=12287,t=3,p=1", "below OWASP"),
            ("$argon2id$v=19$m=9215,t=4,p=1", "below OWASP"),
            ("$argon2id$v=19$m=7167,t=16,p=1", "below OWASP"),
            (
                "$argon2id$v=19$m=262144,t=0,p=1",
                "invalid argon2 parameters",
            ),
            (
                "$argon2id$v=19$m=65536,t=3,p=0",
                "invalid argon2 parameters",
            ),
            // Above the ceiling that bounds memory and time.
            (
                "$argon2id$v=19$m=4294967295,t=3,p=4",
                "above the accepted maximum",
            ),
            (
                "$argon2id$v=19$m=262145,t=3,p=4",
                "above the accepted maximum",
            ),
            (
                "$argon2id$v=19$m=65536,t=17,p=4",
                "above the accepted maximum",
            ),
            (
                "$argon2id$v=19$m=65536,t=4294967295,p=4",
                "above the accepted maximum",
            ),
            (
                "$argon2id$v=19$m=65536,t=3,p=17",
                "above the accepted maximum",
            ),
            (
                "$argon2id$v=19$m=65536,t=3,p=16777215",
                "above the accepted maximum",
            ),
            ("$argon2id$v=19$t=3,p=4", "gives no `m`"),
            ("$argon2id$v=19$m=65536,p=4", "gives no `t`"),
            ("$argon2id$v=19$m=65536,t=3", "gives no `p`"),
        ];
        for (head, why) in refused {
            let phc = phc_of(head);
            let e = check_phc(&phc).unwrap_err();
            assert!(e.contains(why), "{phc}: {e}");
            assert!(!verify_secret(&phc, "k"), "{phc}");
        }
        // Malformed strings.
        for phc in [
            "$argon2id",
            "$argon2id$v=19$m=65536,t=3,p=4",
            "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ",
            "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
            "$argon2id$v=19$m=65536,t=3,p=4,x=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=-1,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA$x",
        ] {
            assert!(check_phc(phc).is_err(), "{phc}");
        }
        // A tag shorter than 16 bytes.
        let short = phc_of("$argon2id$v=19$m=7168,t=5,p=1");
        let (head, _) = short.rsplit_once('$').unwrap();
        let e = check_phc(&format!("{head}$aGFzaGhhc2hoYXNo")).unwrap_err();
        assert!(e.contains("12-byte hash"), "{e}");

        // Every OWASP pair and the ceiling itself are accepted, and verify.
        for (m, t, p) in [
            (47_104, 1, 1),
            (19_456, 2, 1),
            (12_288, 3, 1),
            (9_216, 4, 1),
            (7_168, 5, 1),
            (7_168, 16, 16),
            (65_536, 3, 4),
            (262_144, 1, 16),
        ] {
            let cost = PhcParams { m_kib: m, t, p };
            let phc = hash_secret_with("the key", cost).unwrap();
            assert_eq!(check_phc(&phc), Ok(cost), "{phc}");
            assert!(verify_secret(&phc, "the key"), "{phc}");
            assert!(!verify_secret(&phc, "the kez"), "{phc}");
        }
    }
}
