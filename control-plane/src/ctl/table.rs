//! Plain-text tables: a header row and aligned columns, numbers right-aligned.

/// Renders `rows` under `headers`; a column whose every cell parses as a number is
/// right-aligned.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let numeric: Vec<bool> = (0..columns)
        .map(|i| {
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|r| r.get(i).is_some_and(|c| c.parse::<f64>().is_ok()))
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if numeric[i] {
                text.push_str(&" ".repeat(pad));
                text.push_str(cell);
            } else {
                text.push_str(cell);
                if i + 1 < cells.len() {
                    text.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_numbers_go_right() {
        let table = render(
            &["CELL", "LOAD"],
            &[
                vec!["hz-a-high-1".into(), "7".into()],
                vec!["bj".into(), "1200".into()],
            ],
        );
        assert_eq!(
            table,
            "CELL         LOAD\nhz-a-high-1     7\nbj           1200\n"
        );
    }

    #[test]
    fn an_empty_table_is_its_header() {
        assert_eq!(render(&["A", "B"], &[]), "A  B\n");
    }
}
