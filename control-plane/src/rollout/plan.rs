//! A rollout's plan: which cells go in which wave. The canary goes alone first; the others
//! follow by id in the waves an operator's spec makes of them (`1,25%,100%`: cumulative
//! counts or percentages of the cells).

use cellmail_proto::error::quote;
use cellmail_proto::{ApiError, CellId};

/// The sizes of the waves `spec` makes of `cells` cells: comma-separated cumulative counts
/// or percentages, non-decreasing, the last one every cell. Waves that add no cell are
/// dropped.
pub fn wave_sizes(spec: &str, cells: usize) -> Result<Vec<usize>, String> {
    let mut sizes = Vec::new();
    let mut reached = 0;
    for part in spec.split(',').map(str::trim) {
        let cumulative = match part.strip_suffix('%') {
            Some(percent) => {
                let percent: usize = percent
                    .parse()
                    .ok()
                    .filter(|p| (1..=100).contains(p))
                    .ok_or_else(|| {
                        format!("{} is not a percentage from 1% to 100%", quote(part))
                    })?;
                (percent * cells).div_ceil(100)
            }
            None => part.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                format!("{} is not a count of cells or a percentage", quote(part))
            })?,
        }
        .min(cells);
        if cumulative < reached {
            return Err(format!(
                "{part:?} is below the wave before it (waves are cumulative)"
            ));
        }
        if cumulative > reached {
            sizes.push(cumulative - reached);
            reached = cumulative;
        }
    }
    if reached != cells {
        return Err(format!(
            "the last wave reaches {reached} of {cells} cells; it must reach every cell (100%)"
        ));
    }
    Ok(sizes)
}

/// The waves of a rollout over `cells`: `canary` (the first cell by id when `None`) alone
/// first, then the others by id in waves of `spec`.
pub fn waves(
    cells: &[CellId],
    canary: Option<&CellId>,
    spec: &str,
) -> Result<Vec<Vec<CellId>>, ApiError> {
    let mut order: Vec<CellId> = cells.to_vec();
    order.sort();
    if let Some(canary) = canary {
        let at = order.iter().position(|c| c == canary).ok_or_else(|| {
            ApiError::invalid(
                "canary",
                format!("cell {canary} is not one of the cells rolled ({order:?})"),
            )
        })?;
        let canary = order.remove(at);
        order.insert(0, canary);
    }
    if order.is_empty() {
        return Err(ApiError::FailedPrecondition(
            "there is no cell to roll out to".into(),
        ));
    }
    // The canary is its own wave whatever the spec's first size; each later wave ends where
    // the spec's cumulative size does.
    let mut ends = vec![1];
    let mut reached = 0;
    for size in wave_sizes(spec, order.len()).map_err(|e| ApiError::invalid("waves", e))? {
        reached += size;
        if ends.last().is_some_and(|end| reached > *end) {
            ends.push(reached);
        }
    }
    let mut start = 0;
    Ok(ends
        .into_iter()
        .map(|end| {
            let wave = order[start..end].to_vec();
            start = end;
            wave
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(n: usize) -> Vec<CellId> {
        (1..=n)
            .map(|i| CellId::new(format!("cell-{i:02}")).unwrap())
            .collect()
    }

    #[test]
    fn wave_sizes_are_cumulative_counts_or_percentages_reaching_every_cell() {
        assert_eq!(wave_sizes("1,25%,100%", 20).unwrap(), vec![1, 4, 15]);
        assert_eq!(wave_sizes("1,25%,100%", 3).unwrap(), vec![1, 2]);
        assert_eq!(wave_sizes("1,2,100%", 3).unwrap(), vec![1, 1, 1]);
        assert_eq!(wave_sizes("100%", 4).unwrap(), vec![4]);
        assert_eq!(wave_sizes("2, 10", 10).unwrap(), vec![2, 8]);
        for (bad, says) in [
            ("1,50%", "must reach every cell"),
            ("5,2,100%", "below the wave before"),
            ("0,100%", "not a count"),
            ("1,150%", "not a percentage"),
            ("one,100%", "not a count"),
        ] {
            let err = wave_sizes(bad, 10).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn the_canary_is_the_first_wave_alone_and_the_rest_follow_by_id() {
        let all = cells(5);
        let planned = waves(&all, Some(&all[3]), "1,60%,100%").unwrap();
        assert_eq!(
            planned,
            vec![
                vec![all[3].clone()],
                vec![all[0].clone(), all[1].clone()],
                vec![all[2].clone(), all[4].clone()],
            ]
        );
        let planned = waves(&all, None, "100%").unwrap();
        assert_eq!(planned, vec![vec![all[0].clone()], all[1..].to_vec()]);
        let stranger = CellId::new("cell-99").unwrap();
        match waves(&all, Some(&stranger), "100%") {
            Err(ApiError::InvalidArgument { field, .. }) => assert_eq!(field, "canary"),
            other => panic!("{other:?}"),
        }
        match waves(&all, None, "1,50%") {
            Err(ApiError::InvalidArgument { field, .. }) => assert_eq!(field, "waves"),
            other => panic!("{other:?}"),
        }
    }
}
