//! Finds the YAML line of a key path, so validation errors (found after serde is done, when
//! spans are gone) can still name a line. Block-style YAML only; for flow style it falls back
//! to the deepest key it could find.

struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

/// 1-based line of `path` (`["upstream", "identity", "token_url"]`, list items as indices
/// `["listen", "0", "addr"]`), or of its deepest ancestor that exists.
pub fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<Line> = text
        .lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let t = l.trim_start();
            if t.is_empty() || t.starts_with('#') || t == "---" {
                return None;
            }
            Some(Line {
                no: i + 1,
                indent: l.len() - t.len(),
                text: t,
            })
        })
        .collect();

    // The scope is a range of lines and the indentation of their parent.
    let (mut lo, mut hi) = (0usize, lines.len());
    let mut parent: isize = -1;
    let mut found = None;
    for seg in path {
        if let Ok(idx) = seg.parse::<usize>() {
            // Items of a block sequence: lines starting with '-' at the shallowest indent in scope.
            let items: Vec<usize> = (lo..hi)
                .filter(|&i| lines[i].indent as isize > parent - 1 && is_item(lines[i].text))
                .collect();
            let Some(min) = items.iter().map(|&i| lines[i].indent).min() else {
                return found;
            };
            let items: Vec<usize> = items
                .into_iter()
                .filter(|&i| lines[i].indent == min)
                .collect();
            let Some(&start) = items.get(idx) else {
                return found;
            };
            let end = items.get(idx + 1).copied().unwrap_or(hi);
            found = Some(lines[start].no);
            // Inside the item, keys sit two columns right of the dash.
            lo = start;
            hi = end;
            parent = min as isize;
        } else {
            let mut hit = None;
            let mut child_indent = None;
            for (i, line) in lines.iter().enumerate().take(hi).skip(lo) {
                let (indent, body) = key_view(line);
                if (indent as isize) <= parent {
                    continue;
                }
                let ci = *child_indent.get_or_insert(indent);
                if indent != ci {
                    continue;
                }
                if starts_with_key(body, seg) {
                    hit = Some((i, indent));
                    break;
                }
            }
            let Some((i, indent)) = hit else {
                return found;
            };
            found = Some(lines[i].no);
            let end = (i + 1..hi)
                .find(|&j| {
                    let (ind, _) = key_view(&lines[j]);
                    ind <= indent
                })
                .unwrap_or(hi);
            lo = i + 1;
            hi = end;
            parent = indent as isize;
        }
    }
    found
}

fn is_item(t: &str) -> bool {
    t == "-" || t.starts_with("- ")
}

/// A line as a mapping key would see it: `- key: v` counts as `key: v` two columns further.
fn key_view<'a>(l: &Line<'a>) -> (usize, &'a str) {
    if l.text.starts_with("- ") {
        let rest = l.text[2..].trim_start();
        (l.indent + (l.text.len() - rest.len()), rest)
    } else {
        (l.indent, l.text)
    }
}

fn starts_with_key(body: &str, key: &str) -> bool {
    for quoted in [key.to_string(), format!("\"{key}\""), format!("'{key}'")] {
        if let Some(rest) = body.strip_prefix(quoted.as_str()) {
            let rest = rest.trim_start();
            if rest.starts_with(':') {
                return true;
            }
        }
    }
    false
}
