//! gRPC channels to cells: one lazily connected channel per cell, replaced when the cell's
//! endpoint changes. Shared by everything that calls a cell: the router (sends), the control
//! plane (tenant moves) and cells themselves (feedback that reached a cell a tenant left).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use cellmail_proto::v1::cell_client::CellClient;
use cellmail_proto::{ApiError, CellId};
use tonic::transport::{Channel, Endpoint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest any call to a cell may take to answer when its caller set no shorter
/// deadline: a hung cell fails its calls instead of holding them (and a move) forever.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct CellChannels {
    by_cell: Mutex<HashMap<CellId, (String, CellClient<Channel>)>>,
}

impl CellChannels {
    /// A client of `cell` at `endpoint` (`http://host:port`).
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
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| ApiError::Unavailable(format!("cell {cell} has a bad endpoint: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        let client = CellClient::new(channel);
        by_cell.insert(cell.clone(), (endpoint.to_owned(), client.clone()));
        Ok(client)
    }
}
