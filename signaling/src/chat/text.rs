//! Pure text functions of chat: `@mention` extraction, case folding, the unigram/bigram tokens
//! that index 1-2 character search terms, search query parsing, and snippets with highlight
//! ranges. No I/O; table-tested.


use super::ChatError;

/// Mentions kept per message.
pub const MAX_MENTIONS: usize = 20;
pub const MAX_QUERY_BYTES: usize = 256;
pub const MAX_QUERY_TERMS: usize = 8;
/// Characters of text shown around a match.
const SNIPPET_CHARS: usize = 160;
const SNIPPET_LEAD: usize = 50;

/// `@identity` mentions in `text`, in order of first appearance, without `author` itself. An `@`
/// starts a mention at the start of the text or after anything but an ASCII letter or digit (so
/// e-mail addresses are not mentions, and `你好@张三` is); the identity runs to whitespace or one of `,;:!?()[]{}<>"'`, and
/// a trailing `.` is dropped.
pub fn mentions(text: &str, author: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut prev: Option<char> = None;
    for (i, c) in text.char_indices() {
        let starts = c == '@' && prev.is_none_or(|p| !p.is_ascii_alphanumeric());
        prev = Some(c);
        if !starts {
            continue;
        }
        let rest = &text[i + 1..];
        let end = rest.find(|c: char| c.is_whitespace() || ",;:!?()[]{}<>\"'@".contains(c)).unwrap_or(rest.len());
        let ident = rest[..end].trim_end_matches('.');
        if !ident.is_empty() && ident.len() <= crate::auth::MAX_IDENTITY_LEN && ident != author && !out.iter().any(|m| m == ident) {
            out.push(ident.to_owned());
            if out.len() == MAX_MENTIONS {
                break;
            }
        }
    }
    out
}

/// Simple case folding, one character to one character (so offsets stay aligned).
pub fn fold(c: char) -> char {
    c.to_lowercase().next().unwrap_or(c)
}

/// Characters written as themselves in gram tokens: ones FTS5's `unicode61` tokenizer certainly
/// keeps as token characters (ASCII letters and digits, CJK ideographs, kana, hangul).
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(u32::from(c), 0x3040..=0x30ff | 0x3400..=0x4dbf | 0x4e00..=0x9fff | 0xac00..=0xd7af | 0xf900..=0xfaff)
}

fn push_gram(out: &mut String, gram: &[char]) {
    if gram.iter().all(|&c| plain(c)) {
        out.extend(gram);
    } else {
        // `x` + hex code points: at least 3 characters, so never equal to a plain 1-2 character gram.
        for &c in gram {
            out.push('x');
            let _ = std::fmt::Write::write_fmt(out, format_args!("{:x}", u32::from(c)));
        }
    }
}

/// The index token of a 1-2 character (folded) gram.
pub fn gram_token(gram: &[char]) -> String {
    let mut t = String::new();
    push_gram(&mut t, gram);
    t
}

/// All distinct folded unigrams and bigrams of `text` without whitespace, as index tokens
/// separated by spaces.
pub fn gram_tokens(text: &str) -> String {
    const ONE: char = '\0';
    let chars: Vec<char> = text.chars().map(fold).collect();
    let mut grams: Vec<(char, char)> = Vec::with_capacity(chars.len() * 2);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_whitespace() {
            continue;
        }
        grams.push((c, ONE));
        if let Some(&d) = chars.get(i + 1)
            && !d.is_whitespace()
        {
            grams.push((c, d));
        }
    }
    grams.sort_unstable();
    grams.dedup();
    let mut out = String::with_capacity(grams.len() * 4);
    for (c, d) in grams {
        if !out.is_empty() {
            out.push(' ');
        }
        if d == ONE { push_gram(&mut out, &[c]) } else { push_gram(&mut out, &[c, d]) }
    }
    out
}

/// A parsed search: whitespace-separated terms, folded; a message matches when it contains every
/// term as a substring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchQuery {
    pub terms: Vec<String>,
}

impl SearchQuery {
    pub fn parse(q: &str) -> Result<Self, ChatError> {
        if q.len() > MAX_QUERY_BYTES {
            return Err(ChatError::BadMessage(format!("query longer than {MAX_QUERY_BYTES} bytes")));
        }
        if q.chars().any(char::is_control) {
            return Err(ChatError::BadMessage("query contains control characters".into()));
        }
        let mut terms: Vec<String> = Vec::new();
        for t in q.split_whitespace() {
            let t: String = t.chars().map(fold).collect();
            if !terms.contains(&t) {
                terms.push(t);
            }
        }
        if terms.is_empty() {
            return Err(ChatError::BadMessage("empty query".into()));
        }
        if terms.len() > MAX_QUERY_TERMS {
            return Err(ChatError::BadMessage(format!("more than {MAX_QUERY_TERMS} terms")));
        }
        Ok(Self { terms })
    }

    /// Terms of at least 3 characters, which the trigram index answers.
    pub fn long_terms(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().filter(|t| t.chars().count() >= 3).map(String::as_str)
    }

    /// The FTS5 MATCH expression of the long terms (each a quoted string, all required), or
    /// None when every term is shorter than 3 characters.
    pub fn fts_expression(&self) -> Option<String> {
        let parts: Vec<String> = self.long_terms().map(|t| format!("\"{}\"", t.replace('"', "\"\""))).collect();
        if parts.is_empty() { None } else { Some(parts.join(" AND ")) }
    }

    /// The gram to look up when no term is long: the longest short term (2 characters are more
    /// selective than 1).
    pub fn short_gram(&self) -> Vec<char> {
        self.terms.iter().map(|t| t.chars().collect::<Vec<char>>()).max_by_key(Vec::len).unwrap_or_default()
    }

    /// True when folded `text` contains every term.
    pub fn matches(&self, text: &str) -> bool {
        let folded: String = text.chars().map(fold).collect();
        self.terms.iter().all(|t| folded.contains(t.as_str()))
    }
}

/// A window of `text` around the first match of any term, and the `[start, end)` code point
/// ranges of all matches inside it (merged where they overlap).
pub fn snippet(text: &str, q: &SearchQuery) -> (String, Vec<(usize, usize)>) {
    let chars: Vec<char> = text.chars().collect();
    let folded: Vec<char> = chars.iter().map(|&c| fold(c)).collect();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for term in &q.terms {
        let t: Vec<char> = term.chars().collect();
        if t.is_empty() || t.len() > folded.len() {
            continue;
        }
        for i in 0..=folded.len() - t.len() {
            if folded[i..i + t.len()] == t[..] {
                ranges.push((i, i + t.len()));
            }
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
            _ => merged.push(r),
        }
    }
    let (start, end) = if chars.len() <= SNIPPET_CHARS {
        (0, chars.len())
    } else {
        let first = merged.first().map_or(0, |r| r.0);
        let start = first.saturating_sub(SNIPPET_LEAD).min(chars.len() - SNIPPET_CHARS);
        (start, start + SNIPPET_CHARS)
    };
    let mut s = String::new();
    let lead = usize::from(start > 0);
    if start > 0 {
        s.push('…');
    }
    s.extend(&chars[start..end]);
    if end < chars.len() {
        s.push('…');
    }
    let highlights = merged
        .into_iter()
        .filter(|&(a, b)| b > start && a < end)
        .map(|(a, b)| (a.max(start) - start + lead, b.min(end) - start + lead))
        .collect();
    (s, highlights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mention_table() {
        let cases: &[(&str, &[&str])] = &[
            ("hi @bob", &["bob"]),
            ("@bob, @carol: look", &["bob", "carol"]),
            ("mail me at bob@example.com", &[]),
            ("@bob @bob @bob", &["bob"]),
            ("(@dave) and @erin.", &["dave", "erin"]),
            ("@alice is me", &[]),
            ("@ alone", &[]),
            ("你好@张三 世界", &["张三"]),
            ("@user.name.with.dots.", &["user.name.with.dots"]),
            ("@a@b", &["a"]),
        ];
        for (text, want) in cases {
            assert_eq!(mentions(text, "alice"), want.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{text}");
        }
        let many: String = (0..30).map(|i| format!("@u{i} ")).collect();
        assert_eq!(mentions(&many, "x").len(), MAX_MENTIONS);
        assert!(mentions(&format!("@{}", "x".repeat(200)), "a").is_empty(), "identity too long");
    }

    #[test]
    fn grams_table() {
        let cases: &[(&[char], &str)] = &[(&['a'], "a"), (&['世', '界'], "世界"), (&['-'], "x2d"), (&['a', '-'], "x61x2d"), (&['é'], "xe9"), (&['ㄱ'], "x3131")];
        for (g, want) in cases {
            assert_eq!(gram_token(g), *want, "{g:?}");
        }
        assert_eq!(gram_tokens("Ab b"), "a ab b");
        assert_eq!(gram_tokens("ok, ok"), "x2c k x6bx2c o ok");
        let t = gram_tokens("你好世界");
        for g in [&['世', '界'][..], &['你'][..], &['界'][..]] {
            assert!(t.split(' ').any(|x| x == gram_token(g)), "{g:?} indexed");
        }
        assert!(!t.split(' ').any(|x| x == gram_token(&['好', '界'])));
    }

    #[test]
    fn query_table() {
        let q = SearchQuery::parse("  Deploy  世界 x deploy ").unwrap();
        assert_eq!(q.terms, vec!["deploy", "世界", "x"]);
        assert_eq!(q.fts_expression().as_deref(), Some("\"deploy\""));
        assert_eq!(SearchQuery::parse("世界").unwrap().fts_expression(), None);
        assert_eq!(SearchQuery::parse("a 世界").unwrap().short_gram(), vec!['世', '界']);
        assert_eq!(SearchQuery::parse("say \"hi\" now").unwrap().fts_expression().as_deref(), Some("\"say\" AND \"\"\"hi\"\"\" AND \"now\""));
        for bad in ["", "   ", &"x".repeat(300), "a b c d e f g h i", "a\u{0}b"] {
            assert!(SearchQuery::parse(bad).is_err(), "{bad:?}");
        }
        let q = SearchQuery::parse("DEPLOY fin").unwrap();
        assert!(q.matches("Deployment finished"));
        assert!(!q.matches("Deployment started"));
    }

    #[test]
    fn snippet_table() {
        let q = SearchQuery::parse("deploy").unwrap();
        assert_eq!(snippet("Deployment finished", &q), ("Deployment finished".to_string(), vec![(0, 6)]));
        let q = SearchQuery::parse("世界").unwrap();
        assert_eq!(snippet("你好世界", &q), ("你好世界".to_string(), vec![(2, 4)]));
        let q = SearchQuery::parse("ab b").unwrap();
        assert_eq!(snippet("xabx b", &q).1, vec![(1, 3), (5, 6)], "overlaps merge, all matches");
        let long = format!("{}needle{}", "a".repeat(300), "b".repeat(300));
        let q = SearchQuery::parse("needle").unwrap();
        let (s, h) = snippet(&long, &q);
        assert!(s.starts_with('…') && s.ends_with('…'));
        assert_eq!(s.chars().count(), SNIPPET_CHARS + 2);
        let c: Vec<char> = s.chars().collect();
        assert_eq!(h.len(), 1);
        assert_eq!(c[h[0].0..h[0].1].iter().collect::<String>(), "needle");
        let end = format!("{}needle", "a".repeat(300));
        let (s, h) = snippet(&end, &q);
        let c: Vec<char> = s.chars().collect();
        assert_eq!(c[h[0].0..h[0].1].iter().collect::<String>(), "needle", "match at the very end stays inside");
        assert!(!s.ends_with('…'));
    }
}
