//! The `CoreWorker` gRPC service every ionet process serves: tasks pushed to workers,
//! and owners answering for their objects.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ionet_common::rpc::proto::worker::core_worker_server::CoreWorker as CoreWorkerRpc;
use ionet_common::rpc::proto::worker::{
    get_object_reply, push_task_reply, task_arg, task_failure, ExitReply, ExitRequest, GetObjectReply,
    GetObjectRequest, PushTaskReply, PushTaskRequest, TaskFailure,
};
use ionet_common::{IonetError, ObjectId, TaskId};
use tonic::{Request, Response, Status};

use crate::context;
use crate::object_store::Bytes;
use crate::runtime::{CoreWorker, ObjectState};
use crate::task::{self, ArgBytes, Failure, FailureKind};

pub(crate) struct CoreWorkerService {
    pub(crate) worker: Arc<CoreWorker>,
}

fn failure_reply(worker: &CoreWorker, function: &str, task_id: &[u8], failure: Failure) -> PushTaskReply {
    let kind = match failure.kind {
        FailureKind::Error => task_failure::Kind::Error,
        FailureKind::Panic => task_failure::Kind::Panic,
        FailureKind::UnknownFunction => task_failure::Kind::UnknownFunction,
        FailureKind::BadArguments => task_failure::Kind::BadArguments,
    };
    PushTaskReply {
        result: Some(push_task_reply::Result::Failure(TaskFailure {
            kind: kind as i32,
            function_name: function.to_string(),
            message: failure.message,
            node_id: worker.node_id.to_vec(),
            task_id: task_id.to_vec(),
        })),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        format!("panicked: {text}")
    } else if let Some(text) = payload.downcast_ref::<String>() {
        format!("panicked: {text}")
    } else {
        "panicked with a non-string payload".to_string()
    }
}

#[tonic::async_trait]
impl CoreWorkerRpc for CoreWorkerService {
    async fn push_task(&self, request: Request<PushTaskRequest>) -> Result<Response<PushTaskReply>, Status> {
        if !self.worker.is_worker {
            return Err(Status::failed_precondition("this process is a driver; tasks go to leased workers"));
        }
        let request = request.into_inner();
        let function_name = request.function_name.clone();
        let Some(function) = task::lookup(&function_name) else {
            let failure = Failure {
                kind: FailureKind::UnknownFunction,
                message: format!("no remote function named {function_name} in this binary"),
            };
            return Ok(Response::new(failure_reply(&self.worker, &function_name, &request.task_id, failure)));
        };
        let mut args = Vec::with_capacity(request.args.len());
        for (index, arg) in request.args.into_iter().enumerate() {
            match arg.value {
                Some(task_arg::Value::Inline(bytes)) => args.push(ArgBytes(Bytes::Owned(Arc::new(bytes)))),
                Some(task_arg::Value::Stored(stored)) => match self.worker.read_stored(&stored).await {
                    Ok(bytes) => args.push(ArgBytes(bytes)),
                    Err(err) => {
                        let failure = Failure {
                            kind: FailureKind::BadArguments,
                            message: format!("argument {index} could not be read: {err}"),
                        };
                        return Ok(Response::new(failure_reply(
                            &self.worker,
                            &function_name,
                            &request.task_id,
                            failure,
                        )));
                    }
                },
                None => return Err(Status::invalid_argument(format!("argument {index} has no value"))),
            }
        }
        let task_id = TaskId::from_bytes(&request.task_id).ok();
        let return_id = ObjectId::from_bytes(&request.return_object_id)?;
        let inline_threshold = request.inline_threshold as usize;
        let worker = self.worker.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            context::set_current_task(task_id);
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| (function.invoke)(args)));
            context::set_current_task(None);
            // Large values go to this node's store, and only their location travels back.
            result.map(|value| {
                value.and_then(|bytes| {
                    if bytes.len() <= inline_threshold {
                        return Ok(push_task_reply::Result::Inline(bytes));
                    }
                    let size = bytes.len() as u64;
                    worker
                        .store_value(return_id, |buffer| buffer.copy_from_slice(&bytes), size)
                        .map(push_task_reply::Result::Stored)
                        .map_err(|err| Failure::error(format!("the return value could not be stored: {err}")))
                })
            })
        })
        .await
        .map_err(|err| Status::internal(format!("task thread failed: {err}")))?;
        let reply = match outcome {
            Ok(Ok(result)) => PushTaskReply { result: Some(result) },
            Ok(Err(failure)) => failure_reply(&self.worker, &function_name, &request.task_id, failure),
            Err(payload) => {
                let failure = Failure { kind: FailureKind::Panic, message: panic_message(payload.as_ref()) };
                failure_reply(&self.worker, &function_name, &request.task_id, failure)
            }
        };
        Ok(Response::new(reply))
    }

    async fn get_object(&self, request: Request<GetObjectRequest>) -> Result<Response<GetObjectReply>, Status> {
        let request = request.into_inner();
        let id = ObjectId::from_bytes(&request.object_id)?;
        let deadline = Instant::now() + Duration::from_millis(request.timeout_ms.min(60_000));
        let result = match self.worker.resolve(id, &self.worker.address, Some(deadline)).await {
            Ok(ObjectState::Inline(bytes)) => get_object_reply::Result::Inline(bytes.to_vec()),
            Ok(ObjectState::Stored(stored)) => get_object_reply::Result::Stored(stored),
            Ok(ObjectState::Failed(error)) => get_object_reply::Result::Failure(TaskFailure {
                kind: task_failure::Kind::Error as i32,
                function_name: String::new(),
                message: error.to_string(),
                node_id: self.worker.node_id.to_vec(),
                task_id: Vec::new(),
            }),
            Ok(ObjectState::Pending) | Err(IonetError::Timeout(_)) => get_object_reply::Result::Pending(true),
            Err(error) => get_object_reply::Result::Unknown(error.to_string()),
        };
        Ok(Response::new(GetObjectReply { result: Some(result) }))
    }

    async fn exit(&self, _request: Request<ExitRequest>) -> Result<Response<ExitReply>, Status> {
        if self.worker.is_worker {
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                std::process::exit(0);
            });
        }
        Ok(Response::new(ExitReply {}))
    }
}
