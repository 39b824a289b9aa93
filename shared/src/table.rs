//! The one table layout of both binaries' listings: columns padded to their widest cell
//! (counted in characters, so `µs` and `…` line up), two spaces between columns, no
//! trailing blanks.

/// Renders `rows` (the first is usually the header) as lines ending in `\n`.
pub fn render<S: AsRef<str>>(rows: &[Vec<S>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.as_ref().chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let cell = cell.as_ref();
            line.push_str(cell);
            let pad = widths[i].saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn pads_by_characters_and_trims_the_last_column() {
        let rows = vec![
            vec!["NAME", "LAG", "NOTE"],
            vec!["vol-µ", "12 ms", ""],
            vec!["v", "1 s", "syncing…"],
        ];
        assert_eq!(
            render(&rows),
            "NAME   LAG    NOTE\nvol-µ  12 ms\nv      1 s    syncing…\n"
        );
    }

    #[test]
    fn ragged_rows_and_no_rows() {
        assert_eq!(render::<&str>(&[]), "");
        let rows = vec![
            vec!["a".to_owned(), "bb".to_owned()],
            vec!["ccc".to_owned()],
        ];
        assert_eq!(render(&rows), "a    bb\nccc\n");
    }
}
