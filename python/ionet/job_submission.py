"""Submitting jobs to a cluster's job server, as `ray.job_submission`.

    from ionet.job_submission import JobSubmissionClient, JobStatus

    client = JobSubmissionClient("https://head.example:8265", api_key=KEY)
    job = client.submit_job(
        entrypoint="python train.py",
        runtime_env={"working_dir": ".", "env_vars": {"EPOCHS": "3"}},
    )
    print(client.get_job_status(job), client.get_job_logs(job))

The job server is the head's (Ray's Jobs REST API, port 8265 by default); the entrypoint
runs as a driver on a node the head picks, under the account whose API key submitted it.
Local directories in the runtime environment (`working_dir`, `py_modules`) are packed by
content and uploaded once, as Ray's client does. Ray's own `JobSubmissionClient` works
against an ionet head too (pass `headers={"Authorization": "Bearer " + KEY}`).
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Union

from ionet import _ionet

__all__ = ["JobSubmissionClient", "JobStatus", "JobDetails", "JobInfo", "DriverInfo"]

_PACKAGE_SCHEME = "gcs://"


class JobStatus(str, enum.Enum):
    """Where a submitted job is (Ray's)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value

    def is_terminal(self) -> bool:
        return self in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED)


@dataclass
class DriverInfo:
    id: str
    node_ip_address: str
    pid: str


@dataclass
class JobDetails:
    """A submitted job, as `get_job_info` and `list_jobs` return it (Ray's fields, and
    ionet's `account` and `job_ids`)."""

    type: str
    status: JobStatus
    entrypoint: str
    submission_id: Optional[str] = None
    job_id: Optional[str] = None
    message: Optional[str] = None
    error_type: Optional[str] = None
    start_time: Optional[int] = None
    end_time: Optional[int] = None
    metadata: Dict[str, str] = field(default_factory=dict)
    runtime_env: Dict[str, Any] = field(default_factory=dict)
    driver_info: Optional[DriverInfo] = None
    driver_agent_http_address: Optional[str] = None
    driver_node_id: Optional[str] = None
    driver_exit_code: Optional[int] = None
    account: Optional[str] = None
    job_ids: List[str] = field(default_factory=list)
    events: List[Dict[str, Any]] = field(default_factory=list)

    @classmethod
    def _from_json(cls, data: Dict[str, Any]) -> "JobDetails":
        known = {name: data.get(name) for name in cls.__dataclass_fields__ if name in data}
        known["status"] = JobStatus(data["status"])
        if data.get("driver_info"):
            known["driver_info"] = DriverInfo(**data["driver_info"])
        for name in ("metadata", "runtime_env"):
            known[name] = data.get(name) or {}
        known["job_ids"] = data.get("job_ids") or []
        known["events"] = data.get("events") or []
        return cls(**known)


JobInfo = JobDetails


class JobSubmissionClient:
    """A client of a head's job server.

    address: `http(s)://host:port` of the job server; default `IONET_JOB_SERVER_ADDRESS`,
        else the one this machine's session's head serves.
    api_key: an account's API key (`ionet account create NAME`), which submits and pays;
        default `IONET_API_KEY`, else (on the head's machine) the operator's credential.
    headers: sent with every request (Ray's argument; an `Authorization` header here is
        used instead of `api_key`).
    verify: for an https job server: True trusts the cluster CA (`IONET_CA_FILE`, else
        the session's), a path trusts that CA file, False checks nothing (insecure).
    """

    def __init__(
        self,
        address: Optional[str] = None,
        *,
        api_key: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
        verify: Union[bool, str] = True,
        _session_dir: Optional[str] = None,
        timeout: float = 60.0,
    ):
        default_address, operator, session_ca = _ionet.job_server_defaults(_session_dir)
        address = address or os.environ.get("IONET_JOB_SERVER_ADDRESS") or default_address
        if not address:
            raise ValueError(
                "no job server address: pass address='http(s)://HOST:PORT' (the head's job server, port 8265), "
                "or run this on the head's machine"
            )
        if "://" not in address:
            raise ValueError(f"the job server address {address!r} needs its scheme: http://HOST:PORT or https://HOST:PORT")
        self._address = address.rstrip("/")
        self._headers = dict(headers or {})
        if not any(name.lower() == "authorization" for name in self._headers):
            key = api_key or os.environ.get("IONET_API_KEY") or operator
            if not key:
                raise ValueError("no credential: pass api_key= (an account's key) or set IONET_API_KEY")
            self._headers["Authorization"] = f"Bearer {key}"
        self._timeout = timeout
        self._context: Optional[ssl.SSLContext] = None
        if self._address.startswith("https://"):
            if verify is False:
                self._context = ssl._create_unverified_context()
            elif isinstance(verify, str):
                self._context = ssl.create_default_context(cafile=verify)
            elif session_ca:
                self._context = ssl.create_default_context(cadata=session_ca)
            else:
                self._context = ssl.create_default_context()
        self.get_version()

    # ---- HTTP ----

    def _request(self, method: str, path: str, body: Optional[bytes] = None, json_body: Any = None) -> "tuple[int, bytes]":
        headers = dict(self._headers)
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self._address + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout, context=self._context) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except urllib.error.URLError as err:
            raise ConnectionError(f"cannot reach the job server at {self._address}: {err.reason}") from None

    def _call(self, method: str, path: str, json_body: Any = None) -> Any:
        status, body = self._request(method, path, json_body=json_body)
        if status != 200:
            raise RuntimeError(f"Request failed with status code {status}: {body.decode(errors='replace').strip()}.")
        return json.loads(body)

    # ---- packages ----

    def _upload(self, directory: str, excludes: List[str], under_own_name: bool) -> str:
        name, archive = _ionet.package_directory(os.path.abspath(directory), list(excludes), under_own_name)
        path = f"/api/packages/gcs/{name}"
        status, body = self._request("GET", path)
        if status == 404:
            status, body = self._request("PUT", path, body=archive)
        if status != 200:
            raise RuntimeError(f"uploading {directory}: status {status}: {body.decode(errors='replace').strip()}")
        return _PACKAGE_SCHEME + name

    def _upload_local_dirs(self, runtime_env: Dict[str, Any]) -> Dict[str, Any]:
        runtime_env = dict(runtime_env)
        excludes = list(runtime_env.get("excludes") or [])
        working_dir = runtime_env.get("working_dir")
        if isinstance(working_dir, (str, os.PathLike)) and not str(working_dir).startswith(_PACKAGE_SCHEME):
            runtime_env["working_dir"] = self._upload(str(working_dir), excludes, False)
        modules = runtime_env.get("py_modules")
        if modules is not None:
            uploaded = []
            for module in modules:
                if hasattr(module, "__file__") and module.__file__:
                    module = os.path.dirname(module.__file__)
                module = str(module)
                uploaded.append(module if module.startswith(_PACKAGE_SCHEME) else self._upload(module, excludes, True))
            runtime_env["py_modules"] = uploaded
        return runtime_env

    # ---- Ray's methods ----

    def get_version(self) -> str:
        return self._call("GET", "/api/version")["version"]

    def submit_job(
        self,
        *,
        entrypoint: str,
        job_id: Optional[str] = None,
        runtime_env: Optional[Dict[str, Any]] = None,
        metadata: Optional[Dict[str, str]] = None,
        submission_id: Optional[str] = None,
        entrypoint_num_cpus: Optional[Union[int, float]] = None,
        entrypoint_num_gpus: Optional[Union[int, float]] = None,
        entrypoint_memory: Optional[int] = None,
        entrypoint_resources: Optional[Dict[str, float]] = None,
    ) -> str:
        """Submits `entrypoint` (a shell command line); its submission id."""
        request: Dict[str, Any] = {
            "entrypoint": entrypoint,
            "runtime_env": self._upload_local_dirs(runtime_env or {}),
            "metadata": dict(metadata or {}),
        }
        optional = {
            "submission_id": submission_id or job_id,
            "entrypoint_num_cpus": entrypoint_num_cpus,
            "entrypoint_num_gpus": entrypoint_num_gpus,
            "entrypoint_memory": entrypoint_memory,
            "entrypoint_resources": entrypoint_resources,
        }
        request.update({name: value for name, value in optional.items() if value is not None})
        return self._call("POST", "/api/jobs/", json_body=request)["submission_id"]

    def stop_job(self, job_id: str) -> bool:
        """Asks the job to stop; whether it was running."""
        return self._call("POST", f"/api/jobs/{job_id}/stop")["stopped"]

    def delete_job(self, job_id: str) -> bool:
        """Forgets a job that ended, and its output."""
        return self._call("DELETE", f"/api/jobs/{job_id}")["deleted"]

    def get_job_info(self, job_id: str) -> JobDetails:
        return JobDetails._from_json(self._call("GET", f"/api/jobs/{job_id}"))

    def list_jobs(self) -> List[JobDetails]:
        return [JobDetails._from_json(job) for job in self._call("GET", "/api/jobs/")]

    def get_job_status(self, job_id: str) -> JobStatus:
        return self.get_job_info(job_id).status

    def get_job_logs(self, job_id: str) -> str:
        """What the job's entrypoint printed so far (its drivers print their workers'
        lines, prefixed)."""
        return self._call("GET", f"/api/jobs/{job_id}/logs")["logs"]

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        """What the job prints, as it prints it, until it ends."""
        offset = 0
        while True:
            status = (await asyncio.to_thread(self.get_job_info, job_id)).status
            read = await asyncio.to_thread(self._call, "GET", f"/api/jobs/{job_id}/logs?offset={offset}")
            offset = read["offset"]
            if read["logs"]:
                yield read["logs"]
            elif status.is_terminal():
                return
            else:
                await asyncio.sleep(0.2)
