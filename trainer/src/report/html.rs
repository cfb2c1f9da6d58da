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
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t}</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n",
        t = escape(title)
    )
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
