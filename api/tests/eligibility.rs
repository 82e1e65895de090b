//! The rule of which machine may be picked is written once (`policy::ELIGIBLE`) and rendered
//! twice: as the SQL filter of the pick and as `Candidate::eligible`. This writes a row for
//! every combination of what the rules read (each state and none, allocated or not,
//! crash-looping or not, heard from never / just dead / just alive / now) and checks that both
//! renderings select the same machines, on SQLite and on PostgreSQL.

mod common;

use common::Db;
use metal_api::policy::{self, Candidate};
use metal_types::{MachineId, ProvisioningEvent};

const DEAD_AFTER_MS: i64 = 60_000;

async fn agree(db: &Db) {
    let app = metal_api::App::open(metal_api::Config { db: db.url.clone(), ..Default::default() }).await.unwrap();
    let now = app.now_ms();
    let cutoff = now - DEAD_AFTER_MS;
    let states = std::iter::once(None).chain(ProvisioningEvent::ALL.iter().copied().map(Some));
    let mut n = 0u128;
    let mut rust_eligible = 0;
    for state in states {
        for allocated in [false, true] {
            for crash_loop in [false, true] {
                for last_seen_ms in [None, Some(cutoff - 1), Some(cutoff), Some(cutoff + 1), Some(now)] {
                    n += 1;
                    let c = Candidate { id: MachineId(uuid::Uuid::from_u128(n)), state, allocated, crash_loop, last_seen_ms };
                    rust_eligible += usize::from(c.eligible(now, DEAD_AFTER_MS));
                    app.store.put_candidate("lab", "small", &c).await.unwrap();
                }
            }
        }
    }
    let (by_sql, all) = app.store.eligibility_views("lab", now, DEAD_AFTER_MS).await.unwrap();
    assert_eq!(all.len() as u128, n, "every generated row reads back");
    let by_rust: Vec<MachineId> = all.iter().filter(|c| c.eligible(now, DEAD_AFTER_MS)).map(|c| c.id).collect();
    assert_eq!(by_sql, by_rust, "the SQL and the Rust rendering of policy::ELIGIBLE pick different machines");
    // Waiting, unallocated, not crash-looping, and heard from after the cutoff (two of the five).
    assert_eq!(rust_eligible, 2);
    assert_eq!(by_sql.len(), 2);
    // Every ineligible row is explained by the first rule it breaks.
    for c in all.iter().filter(|c| !by_sql.contains(&c.id)) {
        assert!(policy::why_not(c, now, DEAD_AFTER_MS).is_some(), "{c:?}");
    }
    app.store.close().await;
}

#[tokio::test]
async fn sql_and_rust_agree_on_sqlite() {
    agree(&Db::sqlite()).await;
}

#[tokio::test]
async fn sql_and_rust_agree_on_postgres() {
    let Some(db) = Db::postgres().await else { return };
    agree(&db).await;
}
