//! The `CellAdmin` gRPC service: grants, revocations and freezes from the control plane, and the
//! cell's status. Grant changes go through the writer, in order with the writes they fence.

use cellplane_api::ids::{validate_id, validate_optional_id};
use cellplane_api::proto::cell as pb;
use cellplane_api::proto::cell::cell_admin_server::CellAdmin;
use tonic::{Request, Response, Status};

use crate::error::CellError;
use crate::store::Store;
use crate::store::writer::{Op, Outcome, Writer};

pub struct AdminService {
    cell_id: String,
    store: Store,
    writer: Writer,
}

impl AdminService {
    pub fn new(cell_id: String, store: Store, writer: Writer) -> Self {
        Self {
            cell_id,
            store,
            writer,
        }
    }
}

fn route_key(tenant: &str, conversation: &str) -> Result<(), CellError> {
    validate_id("tenant_id", tenant)?;
    validate_optional_id("conversation_id", conversation)?;
    Ok(())
}

#[tonic::async_trait]
impl CellAdmin for AdminService {
    async fn grant(
        &self,
        request: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::AdminEmpty>, Status> {
        let r = request.into_inner();
        route_key(&r.tenant_id, &r.conversation_id)?;
        if r.epoch == 0 {
            return Err(CellError::invalid("epoch", "must be at least 1").into());
        }
        self.writer
            .submit(Op::Grant {
                tenant: r.tenant_id,
                conversation: r.conversation_id,
                epoch: r.epoch,
            })
            .await?;
        Ok(Response::new(pb::AdminEmpty {}))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::AdminEmpty>, Status> {
        let r = request.into_inner();
        route_key(&r.tenant_id, &r.conversation_id)?;
        validate_id("new_cell_id", &r.new_cell_id)?;
        self.writer
            .submit(Op::Revoke {
                tenant: r.tenant_id,
                conversation: r.conversation_id,
                new_cell: r.new_cell_id,
                new_epoch: r.new_epoch,
            })
            .await?;
        Ok(Response::new(pb::AdminEmpty {}))
    }

    async fn freeze(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::FreezeResponse>, Status> {
        let r = request.into_inner();
        route_key(&r.tenant_id, &r.conversation_id)?;
        match self
            .writer
            .submit(Op::Freeze {
                tenant: r.tenant_id,
                conversation: r.conversation_id,
            })
            .await?
        {
            Outcome::Frozen { last_lsn } => Ok(Response::new(pb::FreezeResponse { last_lsn })),
            other => Err(Status::internal(format!(
                "unexpected writer outcome {other:?}"
            ))),
        }
    }

    async fn unfreeze(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::AdminEmpty>, Status> {
        let r = request.into_inner();
        route_key(&r.tenant_id, &r.conversation_id)?;
        self.writer
            .submit(Op::Unfreeze {
                tenant: r.tenant_id,
                conversation: r.conversation_id,
            })
            .await?;
        Ok(Response::new(pb::AdminEmpty {}))
    }

    async fn cell_status(
        &self,
        _request: Request<pb::CellStatusRequest>,
    ) -> Result<Response<pb::CellStatusResponse>, Status> {
        let mut keys: Vec<pb::OwnedKey> = self
            .writer
            .grants()
            .into_iter()
            .filter(|(_, grant)| grant.moved_to.is_none())
            .map(|((tenant_id, conversation_id), grant)| pb::OwnedKey {
                tenant_id,
                conversation_id,
                epoch: grant.epoch,
                frozen: grant.frozen,
            })
            .collect();
        keys.sort_by(|a, b| {
            (&a.tenant_id, &a.conversation_id).cmp(&(&b.tenant_id, &b.conversation_id))
        });
        Ok(Response::new(pb::CellStatusResponse {
            cell_id: self.cell_id.clone(),
            last_lsn: self.store.last_lsn()?,
            keys,
            conversations: self.store.spaces.conversations.approximate_len() as u64,
            messages: self.store.spaces.messages.approximate_len() as u64,
            disk_bytes: self.store.db.disk_space().unwrap_or(0),
        }))
    }
}
