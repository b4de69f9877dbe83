"""Faults of a soak run, on a schedule: SIGKILL and restart, a SIGTERM drain, a token
rotation and a certificate reload (both by SIGHUP), plus the restart of any replica that
exits on its own (an unexpected exit is a finding, recorded as a fault).

Replica 0 is never killed nor drained: one process lives the whole run, so that its memory
can be followed from start to end.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import grpc.aio

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc

from benchmarks.soak_fleet import (
    CLIENT_OPTIONS, Auth, Replica, Secrets, new_token, presented_certificate,
)

# (fraction of the run, fault); kills and drains go to replicas 1..N-1 in turn
PLAN = (
    (0.20, "SIGKILL"),
    (0.325, "token rotation"),
    (0.45, "SIGKILL"),
    (0.575, "certificate reload"),
    (0.70, "SIGKILL"),
    (0.85, "SIGTERM drain"),
)
RESTART_DELAY_S = 1.0  # from a SIGKILL to the new process (an orchestrator's restart)


@dataclasses.dataclass
class Fault:
    name: str
    replica: int | None  # None: every replica
    start: float  # run clock, seconds
    end: float | None = None  # the fault's own action complete (replica SERVING again, ...)
    detail: str = ""


def schedule(duration_s: float, replicas: int) -> list[tuple[float, str, int | None]]:
    """``(time, fault, replica)`` for a run of ``duration_s`` with ``replicas`` replicas."""
    plan, turn = [], 0
    for fraction, name in PLAN:
        replica = None
        if name in ("SIGKILL", "SIGTERM drain"):
            if replicas < 2:
                continue  # never take the only replica down
            replica = 1 + turn % (replicas - 1)
            turn += 1
        plan.append((round(fraction * duration_s, 1), name, replica))
    return plan


class Faults:
    def __init__(self, replicas: list[Replica], secrets: Secrets, auth: Auth, clock,
                 ready_timeout_s: float, drain_timeout_s: float):
        self.replicas = replicas
        self.secrets = secrets
        self.auth = auth
        self.clock = clock
        self.credentials = secrets.channel_credentials()
        self.ready_timeout_s = ready_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.faults: list[Fault] = []
        self._tasks: dict[int, asyncio.Task] = {}  # replica -> its restart under way

    async def run(self, plan, stop: asyncio.Event) -> None:
        for at, name, replica in plan:
            wait = at - self.clock()
            if wait > 0:
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                    return
                except asyncio.TimeoutError:
                    pass
            while replica in self._tasks and not stop.is_set():  # still restarting
                await asyncio.sleep(0.2)
            if stop.is_set():
                return
            await self.inject(name, replica)

    async def inject(self, name: str, replica: int | None) -> Fault:
        """Inject one fault. A replica taken down restarts in the background (the schedule
        goes on); taking it down again first waits for that restart."""
        if replica is not None and replica in self._tasks:
            await self._tasks[replica]
        fault = Fault(name, replica, self.clock())
        self.faults.append(fault)
        if name == "SIGKILL":
            self._background(replica, self._kill(self.replicas[replica], fault))
        elif name == "SIGTERM drain":
            self._background(replica, self._drain(self.replicas[replica], fault))
        elif name == "token rotation":
            await self._rotate_tokens(fault)
        elif name == "certificate reload":
            await self._reload_certificate(fault)
        else:
            raise ValueError(f"unknown fault {name!r}")
        return fault

    async def settle(self, timeout: float) -> None:
        """Wait for the restarts still under way."""
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=timeout)

    def _background(self, index: int, work) -> None:
        task = asyncio.create_task(work)
        self._tasks[index] = task
        task.add_done_callback(lambda t: self._tasks.pop(index, None) if
                               self._tasks.get(index) is t else None)

    async def supervise(self) -> None:
        """Restart a replica that exited on its own (recorded as an 'unexpected exit')."""
        for replica in self.replicas:
            if replica.index in self._tasks or not replica.exited_unexpectedly():
                continue
            life = replica.lifetimes[-1]
            fault = Fault("unexpected exit", replica.index, self.clock(),
                          detail=f"pid {life.pid} exit {life.returncode}; log {replica.log_path}")
            self.faults.append(fault)
            self._background(replica.index, self._restart(replica, fault))

    async def _kill(self, replica: Replica, fault: Fault) -> None:
        pid = replica.pid
        replica.kill()
        await asyncio.sleep(RESTART_DELAY_S)
        await self._restart(replica, fault)
        fault.detail = f"pid {pid} killed; pid {replica.pid} SERVING after " \
                       f"{fault.end - fault.start:.1f} s"

    async def _drain(self, replica: Replica, fault: Fault) -> None:
        pid = replica.pid
        await replica.drain(self.drain_timeout_s)
        life = next(lt for lt in replica.lifetimes if lt.pid == pid)
        drained = life.ended - fault.start
        await self._restart(replica, fault)
        fault.detail = f"pid {pid} drained and exited {life.returncode} after {drained:.1f} s " \
                       f"({life.how}); pid {replica.pid} SERVING after " \
                       f"{fault.end - fault.start:.1f} s"

    async def _restart(self, replica: Replica, fault: Fault) -> None:
        replica.start()
        fault.end = await replica.wait_serving(self.credentials, self.ready_timeout_s)

    def _hangup_all(self) -> list[Replica]:
        """SIGHUP every replica that is SERVING (one still starting would die of it)."""
        hung = []
        for replica in self.replicas:
            if replica.alive() and replica.lifetimes[-1].serving is not None \
                    and replica.index not in self._tasks:
                replica.hangup()
                hung.append(replica)
        return hung

    async def _rotate_tokens(self, fault: Fault) -> None:
        """Add a new token, SIGHUP, move the clients to it, remove the old one, SIGHUP; then
        check on each replica that the new token is accepted and the old one refused."""
        old, new = self.auth.token, new_token()
        old_name, new_name = f"soak-{self.auth.version}", f"soak-{self.auth.version + 1}"
        self.secrets.write_tokens([(old_name, old), (new_name, new)])
        self._hangup_all()
        await asyncio.sleep(1.0)
        old_version = self.auth.version
        self.auth.token = new
        self.auth.version += 1  # workers make new clients before their next call
        waited = await self._until_unused(old_version, within_s=240)
        self.secrets.write_tokens([(new_name, new)])
        hung = self._hangup_all()
        self.auth.revoked.append(old)
        checks = await asyncio.gather(*(self._token_check(r, new, old) for r in hung))
        fault.end = self.clock()
        fault.detail = f"old token removed when its last call ended, {waited:.1f} s after " \
                       f"the switch; {sum(checks)} of {len(hung)} replicas accept only the new " \
                       "token"

    async def _until_unused(self, version: int, within_s: float) -> float:
        """Wait until no call made with token ``version`` is in flight (a removed token's
        open streams end, so it is removed only when its calls are done); seconds waited."""
        start = self.clock()
        while self.auth.in_use[version] > 0 and self.clock() - start < within_s:
            await asyncio.sleep(0.2)
        return self.clock() - start

    async def _token_check(self, replica: Replica, new: str, old: str, within_s: float = 10):
        """Whether ``replica`` answers the new token and refuses the old one (polled)."""
        deadline = self.clock() + within_s
        async with grpc.aio.secure_channel(replica.address, self.credentials,
                                           options=CLIENT_OPTIONS) as channel:
            stub = pb_grpc.ESMCStub(channel)
            while self.clock() < deadline:
                codes = []
                for token in (new, old):
                    try:
                        await stub.Info(pb.InfoRequest(), timeout=5,
                                        metadata=(("authorization", f"Bearer {token}"),))
                        codes.append("OK")
                    except grpc.aio.AioRpcError as error:
                        codes.append(error.code().name)
                if codes == ["OK", "UNAUTHENTICATED"]:
                    return True
                await asyncio.sleep(0.5)
        return False

    async def _reload_certificate(self, fault: Fault) -> None:
        """A new server certificate (same CA) on disk, SIGHUP; then check that a new
        handshake with each replica gets it."""
        certificate = self.secrets.reissue_certificate()
        hung = self._hangup_all()
        deadline = self.clock() + 10
        pending = {r.index: r for r in hung}
        while pending and self.clock() < deadline:
            for index, replica in list(pending.items()):
                try:
                    presented = await asyncio.to_thread(
                        presented_certificate, replica.port, self.secrets.ca_pem
                    )
                except OSError:
                    continue
                if presented == certificate:
                    del pending[index]
            await asyncio.sleep(0.3)
        fault.end = self.clock()
        fault.detail = f"{len(hung) - len(pending)} of {len(hung)} replicas present the new " \
                       f"certificate to a new connection"
