//! gRPC channels to cells: one lazily connected channel per cell, replaced when the cell's
//! endpoint changes. Shared by everything that calls a cell: the router (sends), the control
//! plane (tenant moves) and cells themselves (feedback that reached a cell a tenant left).
//! Every channel is mutual TLS: it presents this process's certificate and accepts only the
//! cell it was opened to.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellmail_proto::tls::{self, Role, Tls};
use cellmail_proto::v1::cell_client::CellClient;
use cellmail_proto::{ApiError, CellId};
use tonic::transport::Channel;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest any call to a cell may take to answer when its caller set no shorter
/// deadline: a hung cell fails its calls instead of holding them (and a move) forever.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Each cell's endpoint and a client of it.
type ByCell = HashMap<CellId, (String, CellClient<Channel>)>;

/// The channels of one process, shared by its clones.
#[derive(Clone)]
pub struct CellChannels {
    tls: Arc<Tls>,
    by_cell: Arc<Mutex<ByCell>>,
}

impl CellChannels {
    pub fn new(tls: Arc<Tls>) -> Self {
        Self {
            tls,
            by_cell: Arc::default(),
        }
    }

    /// A client of `cell` at `endpoint` (`https://host:port`).
    pub fn client(&self, cell: &CellId, endpoint: &str) -> Result<CellClient<Channel>, ApiError> {
        let mut by_cell = self
            .by_cell
            .lock()
            // Only whole inserts happen under the lock; a panic cannot leave it half-changed.
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((known, client)) = by_cell.get(cell)
            && known == endpoint
        {
            return Ok(client.clone());
        }
        let endpoint_of = tls::endpoint(endpoint)
            .map_err(|e| ApiError::Unavailable(format!("cell {cell} has a bad endpoint: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        let channel = self.tls.channel(endpoint_of, Role::Cell(cell.clone()));
        let client = CellClient::new(channel);
        by_cell.insert(cell.clone(), (endpoint.to_owned(), client.clone()));
        Ok(client)
    }
}
