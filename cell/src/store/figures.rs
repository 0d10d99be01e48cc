//! Each tenant's figures: by hour for its stats and daily cap, by minute for its breakers,
//! and the rows other cells counted for it before it moved here. A move carries them: the
//! target keeps each other cell's part apart from its own, replaced by every later copy, so
//! reads add them up and nothing counts twice.

use cellmail_proto::clock::{HOUR_MS, MINUTE_MS};
use cellmail_proto::{MessageClass, TenantId};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    STATS, STATS_CARRIED, Store, Tables, WINDOW, WINDOW_CARRIED, Write, err, json, parse, past,
};
use crate::commit::{Commit, StorageError, stamp_ms};

/// How many minutes of breaker figures are kept (the longest window a policy may set).
pub const WINDOW_MINUTES: u64 = 24 * 60;
/// How many hours of figures stats answer for, and a move carries.
pub const STATS_HOURS: u64 = 720;

/// Which of a tenant's figures a read adds up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figures {
    /// Only what this cell counted.
    Own,
    /// With what the cells the tenant moved here from counted.
    Carried,
}

/// One row of a tenant's figures as a move carries it: `origin` counted `counts` for
/// `class` in hour (or, `by_minute`, minute) `unit` since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub class: MessageClass,
    pub by_minute: bool,
    pub unit: u64,
    pub origin: String,
    pub counts: Counts,
}

/// A tenant's figures for one message class over some hours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub accepted: u64,
    pub sent: u64,
    pub delivered: u64,
    pub bounced: u64,
    pub complained: u64,
    pub suppressed: u64,
    pub rejected: u64,
    /// Opens, clicks and unsubscribes the tracking host took.
    #[serde(default)]
    pub opened: u64,
    #[serde(default)]
    pub clicked: u64,
    #[serde(default)]
    pub unsubscribed: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.accepted += other.accepted;
        self.sent += other.sent;
        self.delivered += other.delivered;
        self.bounced += other.bounced;
        self.complained += other.complained;
        self.suppressed += other.suppressed;
        self.rejected += other.rejected;
        self.opened += other.opened;
        self.clicked += other.clicked;
        self.unsubscribed += other.unsubscribed;
    }
}

type OwnTable = TableDefinition<'static, (&'static str, &'static str, u64), &'static [u8]>;
type CarriedDefinition =
    TableDefinition<'static, (&'static str, &'static str, u64, &'static str), &'static [u8]>;

/// Adds `delta` to `tenant`'s figures for `class` in the hour of `at_ms`, and to its
/// breaker's minute when it holds what a breaker weighs (dropping minutes past a day).
pub(super) fn count(
    t: &mut Tables,
    tenant: &TenantId,
    class: MessageClass,
    at_ms: u64,
    delta: &Counts,
) -> Result<(), StorageError> {
    let (tenant, c) = (tenant.as_str(), class.as_str());
    add_to(&mut t.stats, (tenant, c, at_ms / HOUR_MS), delta)?;
    if delta.sent + delta.bounced + delta.complained > 0 {
        let minute = at_ms / MINUTE_MS;
        add_to(&mut t.window, (tenant, c, minute), delta)?;
        let oldest = minute.saturating_sub(WINDOW_MINUTES);
        t.window
            .retain_in((tenant, c, 0)..(tenant, c, oldest), |_, _| false)
            .map_err(err)?;
    }
    Ok(())
}

fn add_to(
    table: &mut redb::Table<(&str, &str, u64), &[u8]>,
    key: (&str, &str, u64),
    delta: &Counts,
) -> Result<(), StorageError> {
    let mut counts: Counts = match table.get(key).map_err(err)? {
        Some(row) => parse(row.value())?,
        None => Counts::default(),
    };
    counts.add(delta);
    table.insert(key, json(&counts).as_slice()).map_err(err)?;
    Ok(())
}

/// Sums the rows of `tenant`'s `class` in `own` (and, with [`Figures::Carried`], in
/// `carried`) from bucket `first` to `last`.
fn sum(
    read: &redb::ReadTransaction,
    (own, carried): (OwnTable, CarriedDefinition),
    figures: Figures,
    tenant: &TenantId,
    class: MessageClass,
    (first, last): (u64, u64),
) -> Result<Counts, StorageError> {
    let (t, c) = (tenant.as_str(), class.as_str());
    let mut total = Counts::default();
    let mut add = |value: &[u8]| -> Result<(), StorageError> {
        total.add(&parse(value)?);
        Ok(())
    };
    let table = read.open_table(own).map_err(err)?;
    for row in table.range((t, c, first)..=(t, c, last)).map_err(err)? {
        add(row.map_err(err)?.1.value())?;
    }
    if figures == Figures::Carried {
        let table = read.open_table(carried).map_err(err)?;
        let rows = (t, c, first, "")..(t, c, last.saturating_add(1), "");
        for row in table.range(rows).map_err(err)? {
            add(row.map_err(err)?.1.value())?;
        }
    }
    Ok(total)
}

/// Keeps the figures other cells counted for `tenant`, each row over the one of its origin
/// here, and drops the minutes past the longest breaker window.
pub(super) fn carry(
    t: &mut Tables,
    tenant: &TenantId,
    rows: &[Carried],
) -> Result<(), StorageError> {
    let t = &mut *t;
    for row in rows {
        let table = if row.by_minute {
            &mut t.window_carried
        } else {
            &mut t.stats_carried
        };
        let key = (
            tenant.as_str(),
            row.class.as_str(),
            row.unit,
            row.origin.as_str(),
        );
        table
            .insert(key, json(&row.counts).as_slice())
            .map_err(err)?;
    }
    // Minutes past the longest breaker window are of no use.
    let oldest = (stamp_ms() / MINUTE_MS).saturating_sub(WINDOW_MINUTES);
    for class in MessageClass::ALL {
        let (tenant, c) = (tenant.as_str(), class.as_str());
        t.window_carried
            .retain_in((tenant, c, 0, "")..(tenant, c, oldest, ""), |_, _| false)
            .map_err(err)?;
    }
    Ok(())
}

impl Store {
    /// `tenant`'s figures for `class` over the `hours` hours up to and including `now_ms`'s.
    pub fn stats(
        &self,
        tenant: &TenantId,
        class: MessageClass,
        figures: Figures,
        now_ms: u64,
        hours: u64,
    ) -> Result<Counts, StorageError> {
        let read = self.read()?;
        let last = now_ms / HOUR_MS;
        let hours = ((last + 1).saturating_sub(hours), last);
        sum(&read, (STATS, STATS_CARRIED), figures, tenant, class, hours)
    }

    /// What `tenant`'s breaker for `class` weighs: sent, bounced and complained from the
    /// minute of `from_ms` to that of `now_ms`.
    pub fn window(
        &self,
        tenant: &TenantId,
        class: MessageClass,
        from_ms: u64,
        now_ms: u64,
    ) -> Result<Counts, StorageError> {
        let read = self.read()?;
        let minutes = (from_ms / MINUTE_MS, now_ms / MINUTE_MS);
        let tables = (WINDOW, WINDOW_CARRIED);
        sum(&read, tables, Figures::Carried, tenant, class, minutes)
    }

    /// `tenant`'s figures as a move carries them to another cell: every row this cell
    /// (`this`) counted within the last [`STATS_HOURS`] (and its breakers' minutes), and the
    /// rows it carries from other cells.
    pub fn figures(
        &self,
        tenant: &TenantId,
        this: &str,
        now_ms: u64,
    ) -> Result<Vec<Carried>, StorageError> {
        let read = self.read()?;
        let (t, past) = (tenant.as_str(), past(tenant));
        let first_hour = (now_ms / HOUR_MS).saturating_sub(STATS_HOURS);
        let mut rows = Vec::new();
        for (own, carried, by_minute) in [
            (STATS, STATS_CARRIED, false),
            (WINDOW, WINDOW_CARRIED, true),
        ] {
            let first = if by_minute { 0 } else { first_hour };
            let mut add = |class: &str, unit, origin: &str, value: &[u8]| {
                let class = class.parse().map_err(StorageError::from_display)?;
                if unit >= first {
                    let (origin, counts) = (origin.to_owned(), parse(value)?);
                    rows.push(Carried {
                        class,
                        by_minute,
                        unit,
                        origin,
                        counts,
                    });
                }
                Ok::<_, StorageError>(())
            };
            let table = read.open_table(own).map_err(err)?;
            for row in table
                .range((t, "", 0)..(past.as_str(), "", 0))
                .map_err(err)?
            {
                let (key, value) = row.map_err(err)?;
                let (_, class, unit) = key.value();
                add(class, unit, this, value.value())?;
            }
            let table = read.open_table(carried).map_err(err)?;
            let range = (t, "", 0, "")..(past.as_str(), "", 0, "");
            for row in table.range(range).map_err(err)? {
                let (key, value) = row.map_err(err)?;
                let (_, class, unit, origin) = key.value();
                add(class, unit, origin, value.value())?;
            }
        }
        Ok(rows)
    }

    /// Keeps the figures another cell carried of `tenant` (see [`Store::figures`]), each row
    /// over the one of its origin here (a copy made again is as good); this cell's (`this`)
    /// own rows stay as they are.
    pub async fn carry(
        &self,
        tenant: &TenantId,
        this: &str,
        rows: Vec<Carried>,
    ) -> Result<(), StorageError> {
        let rows = rows.into_iter().filter(|row| row.origin != this).collect();
        let write = Write::Carry {
            tenant: tenant.clone(),
            rows,
        };
        self.found(write, Commit::Durable).await.map(|_| ())
    }
}
