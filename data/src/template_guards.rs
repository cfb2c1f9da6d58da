//! Bounds on the template filters and methods whose arguments size an allocation or a
//! loop. A chat template comes with a downloaded model, so a number in it (a width, a
//! batch count, a repeat) must give a template error, not an aborted allocation or a
//! panic deep in the template library: minijinja sizes `batch`'s and `slice`'s buffers,
//! `indent`'s padding and a format's field width by them as given, and pycompat's
//! `count("")` never ends.

use minijinja::value::{Kwargs, Rest, StringInput, Value};
use minijinja::{Environment, Error, ErrorKind, State};

/// The largest count, width or indent a template may ask for: far past any prompt's
/// layout, far below an allocation that fails.
pub const MAX_SIZE: usize = 65_536;

/// Replaces the bounded filters and wraps pycompat's string methods in `env`.
pub fn install(env: &mut Environment) {
    env.add_filter("batch", batch);
    env.add_filter("slice", slice);
    env.add_filter("indent", indent);
    env.add_filter("format", format);
    env.set_unknown_method_callback(method);
}

fn too_large(what: &str, n: usize) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("{what} {n} is more than {MAX_SIZE}"),
    )
}

fn bounded(what: &str, n: usize) -> Result<(), Error> {
    if n > MAX_SIZE {
        return Err(too_large(what, n));
    }
    Ok(())
}

fn batch(state: &State, value: Value, count: usize, fill: Option<Value>) -> Result<Value, Error> {
    bounded("batch: count", count)?;
    minijinja::filters::batch(state, value, count, fill)
}

fn slice(state: &State, value: Value, count: usize, fill: Option<Value>) -> Result<Value, Error> {
    bounded("slice: count", count)?;
    minijinja::filters::slice(state, value, count, fill)
}

fn indent(
    value: StringInput<'_>,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    if let Some(w) = width {
        bounded("indent: width", w)?;
    }
    let width_kw: Option<usize> = kwargs.get("width")?;
    if let Some(w) = width_kw {
        bounded("indent: width", w)?;
    }
    minijinja::filters::indent(value, width, first, blank, kwargs)
}

fn format(state: &State, spec: &Value, args: Rest<Value>) -> Result<Value, Error> {
    if let Some(s) = spec.as_str() {
        check_widths(s)?;
    }
    minijinja::filters::format(state, spec, args)
}

/// pycompat's methods, with `str.count("")` answered as Python does (one more than the
/// characters) and `str.format`'s widths bounded.
fn method(state: &State, value: &Value, name: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        match (name, args) {
            ("count", [needle]) if needle.as_str() == Some("") => {
                return Ok(Value::from(s.chars().count() + 1));
            }
            ("format", _) => check_widths(s)?,
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, name, args)
}

/// Refuses a field width or precision over [`MAX_SIZE`] in a printf spec (`%…d`) or a
/// `str.format` spec (`{…:…}`): the numbers between the `%` or `:` and the end of the
/// spec. Text outside specs (a phone number in a prompt) is not read.
fn check_widths(spec: &str) -> Result<(), Error> {
    let chars: Vec<char> = spec.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let in_spec = match chars[i] {
            '%' => Some("-+ #0123456789.*"),
            ':' if chars[..i].iter().rposition(|&c| c == '{')
                > chars[..i].iter().rposition(|&c| c == '}') =>
            {
                Some("<>^=-+ #0123456789.,_")
            }
            _ => None,
        };
        i += 1;
        let Some(allowed) = in_spec else { continue };
        let mut number = String::new();
        while i < chars.len() && allowed.contains(chars[i]) {
            if chars[i].is_ascii_digit() {
                number.push(chars[i]);
                // Past usize it does not parse, and is past the bound all the more.
                let n: usize = number.parse().unwrap_or(usize::MAX);
                if n > MAX_SIZE {
                    return Err(too_large("format: field width", n));
                }
            } else {
                number.clear();
            }
            i += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str) -> Result<String, Error> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        install(&mut env);
        env.render_str(source, ())
    }

    #[test]
    fn sizes_past_the_bound_are_template_errors() {
        for source in [
            "{{ [1, 2] | batch(10000000000) }}",
            "{{ [1, 2] | slice(10000000000) }}",
            "{{ 'x\ny' | indent(1000000000000000000) }}",
            "{{ 'x\ny' | indent(width=1000000000000000000) }}",
            "{{ '%1000000000000000000d' | format(1) }}",
            "{{ '%.99999999f' | format(1.5) }}",
            "{{ '{:>99999999}'.format(1) }}",
            "{{ '{0:099999999}'.format(1) }}",
        ] {
            let e = render(source).unwrap_err().to_string();
            assert!(
                e.contains(&format!("is more than {MAX_SIZE}")),
                "{source}: {e}"
            );
        }
    }

    /// Within the bound the filters and methods answer as Jinja and Python do.
    #[test]
    fn sizes_within_the_bound_render_as_before() {
        assert_eq!(
            render("{{ [1, 2, 3] | batch(2) | list }}").unwrap(),
            "[[1, 2], [3]]"
        );
        assert_eq!(
            render("{{ [1, 2, 3] | slice(2) | list }}").unwrap(),
            "[[1, 2], [3]]"
        );
        assert_eq!(render("{{ 'a\nb' | indent(2) }}").unwrap(), "a\n  b");
        assert_eq!(
            render("{{ '%5d|%.2f' | format(7, 1.5) }}").unwrap(),
            "    7|1.50"
        );
        assert_eq!(render("{{ '{:>4}!'.format(7) }}").unwrap(), "   7!");
        assert_eq!(
            render("{{ 'call 1800555123456: {}'.format(1) }}").unwrap(),
            "call 1800555123456: 1"
        );
        // Python's `"abc".count("") == 4`; pycompat never returned.
        assert_eq!(
            render("{{ 'abc'.count('') }}|{{ 'abcb'.count('b') }}").unwrap(),
            "4|2"
        );
    }
}
