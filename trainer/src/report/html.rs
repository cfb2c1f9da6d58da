//! The page's frame: escaping, and the inline style (no external file, font or script).

/// Text made safe inside HTML elements and attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1180px;\
color:#222;background:#fafafa}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;\
border-bottom:1px solid #ddd}h3{font-size:1.05em}.charts{display:flex;flex-wrap:wrap;gap:12px}\
.chart{border:1px solid #ddd;background:#fff}.chart .title{font-size:13px;font-weight:600}\
.chart .tick{font-size:11px;fill:#555}.chart .legend{font-size:11px}table{border-collapse:\
collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;\
font-size:13px}th{background:#f0f0f0}pre{background:#fff;border:1px solid #ddd;padding:8px;\
overflow:auto;font-size:12px;max-height:420px}.note{color:#555;font-size:13px}";

/// A whole page around `body`.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "{HEAD_START}{GENERATOR}<title>{t}</title><style>{STYLE}</style></head><body>\n{body}\n\
         </body></html>\n",
        t = escape(title)
    )
}

/// How every page hearth writes begins, up to its generator mark and title.
pub const HEAD_START: &str = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
     <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">";

/// The mark by which a page is known as hearth's, to be rewritten on the next run.
pub const GENERATOR: &str = "<meta name=\"generator\" content=\"hearth report\">";

/// Whether `text` is a page hearth wrote: it begins as hearth's pages do and carries the
/// generator mark, or (pages from before the mark) the head straight into a `hearth` title.
pub fn is_own_page(text: &str) -> bool {
    text.strip_prefix(HEAD_START)
        .is_some_and(|rest| rest.starts_with(GENERATOR) || rest.starts_with("<title>hearth "))
}

/// A table of `rows` under `head` (no header row when `head` is empty).
pub fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::from("<table>");
    if !head.is_empty() {
        out.push_str("<tr>");
        for h in head {
            out.push_str(&format!("<th>{}</th>", escape(h)));
        }
        out.push_str("</tr>");
    }
    for r in rows {
        out.push_str("<tr>");
        for cell in r {
            out.push_str(&format!("<td>{}</td>", escape(cell)));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hearth's pages, with the mark or from before it, are its own; a user's page whose
    /// title merely starts with "hearth" is not.
    #[test]
    fn own_pages_are_known_by_their_head() {
        assert!(is_own_page(&page("hearth run r", "<p>x</p>")));
        let before_the_mark = format!("{HEAD_START}<title>hearth run r</title><style>");
        assert!(is_own_page(&before_the_mark));
        let notes = "<html><head><title>hearth tuning notes</title></head><body>My notes\
                     </body></html>";
        assert!(!is_own_page(notes));
        assert!(!is_own_page(&format!(
            "{HEAD_START}<title>my notes</title>"
        )));
    }
}
