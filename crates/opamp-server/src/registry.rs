//! The driver side of duplicate-uid detection (UID-8): the registry itself, and every
//! decision, is the core's ([`crate::core::UidRegistry`]); here the application is asked
//! and its answer carried out on the connections.

use opamp_proto::{AgentIdentification, InstanceUid, ServerToAgent};

use crate::callbacks::DuplicateUid;
use crate::connection::Connection;
use crate::core::{Resolution, UidHolder};
use crate::service::Shared;

pub(crate) use crate::core::Claim;

/// The registry of one server, over its connection handles.
pub(crate) type UidRegistry = crate::core::UidRegistry<Connection>;

impl UidHolder for Connection {
    fn is_closed(&self) -> bool {
        Connection::is_closed(self)
    }

    fn same_holder(&self, other: &Self) -> bool {
        self.same_connection(other)
    }
}

/// Keeps `conn`'s claim on `uid` (the uid of its latest message) and, when the message
/// proves a duplicate (UID-8), asks the application and carries out the core's decision.
pub(crate) async fn note(
    shared: &Shared,
    conn: &Connection,
    claim: &mut Option<Claim>,
    uid: InstanceUid,
) {
    if !shared.uids.note(claim, uid, conn) {
        return;
    }
    let Some(claim) = claim.as_mut() else {
        return;
    };
    let rival = shared.uids.rival(&uid, conn);
    let policy = match &rival {
        Some(rival) => {
            let duplicate = DuplicateUid {
                instance_uid: uid,
                kept: conn.clone(),
                newcomer: Some(rival.conn.clone()),
            };
            let policy = shared.callbacks.on_duplicate_uid(&duplicate).await;
            tracing::info!(instance_uid = %uid, ?policy, "duplicate instance uid (UID-8)");
            policy
        }
        None => Default::default(),
    };
    match shared.uids.resolve(claim, conn, rival.as_ref(), policy) {
        Resolution::Disconnect(newcomer) => newcomer.disconnect(),
        Resolution::Reassign(newcomer) => {
            // Goes through the newcomer's own session, which follows it to the new uid
            // (UID-7); if its queue is full or it closed, it is simply not reassigned.
            let _ = newcomer.send(ServerToAgent {
                agent_identification: Some(AgentIdentification {
                    new_instance_uid: InstanceUid::new_v7().to_bytes(),
                }),
                ..ServerToAgent::default()
            });
        }
        _ => {}
    }
}
