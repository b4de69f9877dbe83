"""Keyed bidirectional streams (Embed, PseudoLogLikelihoodStream): one response per request.

Responses go out in completion order, each with its request's ``id``; one bad request answers
its own ``error`` and the stream goes on. At most a window of requests is computed and not yet
written: the next request is read only when a response has been written, so a client that
does not read stops being read (gRPC flow control then holds its sends).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server import convert
from esmc_server.budget import Leased
from esmc_server.errors import Cancelled, InvalidRequest, Unavailable
from esmc_server.outcome import Outcome, abort, as_service_error

log = logging.getLogger(__name__)


async def keyed_stream(
    servicer,
    method: str,
    request_iterator,
    context,
    answer: Callable[[Any, float | None], Any],
    response_type,
    window: int,
) -> None:
    """One response per request, in completion order, each with its request's ``id``.

    ``answer(request, deadline)`` returns the serialized response; an error it raises
    becomes that id's ``error`` (a ``response_type`` message), except ``UNAVAILABLE``,
    which ends the stream. At most ``window`` requests are computed and not yet written:
    the next request is read only when a response has been written, so a client that
    does not read stops being read (gRPC flow control then holds its sends).
    """
    deadline = convert.deadline_of(context)
    stream = KeyedReader(servicer, method, answer, response_type, window, deadline)
    reader = asyncio.create_task(stream.read(request_iterator))
    try:
        while (item := await stream.results.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            response, outcome = item
            try:
                await servicer.write(context, response)
            except BaseException as e:
                outcome.fail(e)
                raise
            finally:
                outcome.record()
                stream.window.release()
    except BaseException as e:
        if not isinstance(e, asyncio.CancelledError):
            error = as_service_error(e, method)
            log.debug("%s stream: %s %s", method, error.code, error)
            await abort(context, error)
        raise
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        stream.cancel()


class KeyedReader:
    """The reading half of one keyed stream: a task per admitted request, results queued.

    ``window`` is acquired before a request is read and released by the writer once that
    request's response has been written. Ids are checked here, once for every keyed stream:
    bounded in length and unique within the stream.
    """

    def __init__(self, servicer, method: str, answer, response_type,
                 window: int, deadline: float | None):
        self.servicer = servicer
        self.method = method
        self.answer = answer
        self.response_type = response_type
        self.deadline = deadline
        self.results: asyncio.Queue = asyncio.Queue()
        self.window = asyncio.Semaphore(window)
        self.ids = servicer.stream_ids.new_set()  # counted server-wide (max_stream_ids)
        self.tasks: set[asyncio.Task] = set()

    async def read(self, request_iterator) -> None:
        """Admit requests while the window allows; None once every one has been answered."""
        try:
            while True:
                await self.window.acquire()
                try:
                    request = await anext(request_iterator)
                except StopAsyncIteration:
                    self.window.release()
                    break
                task = asyncio.create_task(self._answer(request))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            if self.tasks:
                await asyncio.gather(*self.tasks)
            self.results.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the request stream itself failed
            self.results.put_nowait(e)

    def _check_id(self, request_id: str) -> None:
        convert.stream_id_of(request_id)
        if not self.ids.add(request_id):
            raise InvalidRequest(
                f"id {request_id!r} was already used in this stream; ids must be unique"
            )

    async def _answer(self, request) -> None:
        """This id's response, or this id's error: one bad sequence never ends the stream.

        ``UNAVAILABLE`` (not ready, shutting down) ends the whole stream instead, with retry
        pushback, so that clients reconnect (to another replica) rather than spend each id's
        retries on a server that cannot answer any of them.
        """
        outcome = Outcome(self.servicer.metrics, self.method)
        try:
            self._check_id(request.id)
            response = await self.answer(request, self.deadline)
        except asyncio.CancelledError:
            outcome.fail(Cancelled("the call was cancelled"))
            outcome.record()
            raise
        except Unavailable as e:  # loading or shutting down: the whole stream, not this id
            outcome.fail(e)
            outcome.record()
            self.results.put_nowait(e)
            return
        except BaseException as e:
            error = outcome.fail(e)
            response = self.response_type(
                id=request.id[: convert.MAX_ID_CHARS],
                error=pb.Error(code=error.code, message=str(error)),
            )
        self.results.put_nowait((response, outcome))

    def cancel(self) -> None:
        """Stop answering; give back the budget of responses never written, and the ids."""
        for task in self.tasks:
            task.cancel()
        while not self.results.empty():
            item = self.results.get_nowait()
            if isinstance(item, tuple) and isinstance(item[0], Leased):
                item[0].lease.release()
        self.ids.close()
