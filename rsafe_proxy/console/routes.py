"""The console's HTTP surface: its pages under /console, signed in with a console key, served by the proxy's app
(after its canonical-path middleware, beside its API routes, never through their key or screening paths).

Every page is HTML with no script, sent with a strict content security policy, no framing and no caching. Every
POST needs the session's CSRF token and a same-origin request; the session cookie is HttpOnly and
SameSite=Strict. A tenant's key sees that tenant only: another tenant asked for by name is refused (403), and
another tenant's decision is not found (404). Failed sign-ins are limited per client address, and playground
trials in flight per process (limits.py): both answer 429 with Retry-After."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from rsafe_proxy.audit.record import DecisionRecord, DecisionStore, PolicyVersion
from rsafe_proxy.config import ConsoleSettings
from rsafe_proxy.console.diff import changed_lines, side_by_side
from rsafe_proxy.console.filters import ACTIONS, PAGE_SIZE, SIDES, VERDICTS, read_filters
from rsafe_proxy.console.keys import ConsoleKeys, Viewer
from rsafe_proxy.console.limits import InFlight, SignInLimit, whole_seconds
from rsafe_proxy.console.pages import Pages
from rsafe_proxy.console.playground import Trial, try_text
from rsafe_proxy.console.session import COOKIE, Session, SessionSigner
from rsafe_proxy.guard.protocol import Side
from rsafe_proxy.policy.tenancy import Tenancy
from rsafe_proxy.runtime import Runtime

log = logging.getLogger("rsafe_proxy")

PREFIX = "/console"
SECURITY_HEADERS: Mapping[str, str] = {
    # no script at all; styles from the console's own stylesheet; forms post only here; never framed
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # no-referrer would make browsers send `Origin: null`
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
_FORM = "application/x-www-form-urlencoded"
_MAX_ID = 128
T = TypeVar("T")


class _StoreUnreadable(Exception):
    """The decision store failed to answer."""


@dataclass(frozen=True)
class _Visit:
    """A signed-in request: its session, who it is, the proxy it looks at, and the tenancy (tenants and policies)
    it shows, read once when the request began: a reload swaps the runtime's, and a page that awaits the audit
    log or a guard call meanwhile still shows one snapshot throughout."""

    session: Session
    viewer: Viewer
    runtime: Runtime
    tenancy: Tenancy

    @property
    def store(self) -> DecisionStore | None:
        """The proxy's audit log, None when audit is off."""
        return self.runtime.audit

    def tenants(self) -> list[str]:
        """The tenants this viewer sees in the visit's tenancy."""
        return self.viewer.visible(self.tenancy.policies.entries)


def _cross_site(request: Request) -> bool:
    """True when a POST does not come from a page of this origin (the CSRF token is checked besides). The
    browser's Sec-Fetch-Site decides where it is sent: it knows the page's origin, which a reverse proxy that
    terminates TLS or rewrites Host hides from us; Origin is compared only where it is not sent."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    return origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}"


async def _ask(call: Callable[..., T], *args: Any) -> T:
    """A blocking store call, off the event loop."""
    try:
        return await asyncio.to_thread(call, *args)
    except Exception as error:  # a broken store is a page saying so, never the proxy's 500
        raise _StoreUnreadable(str(error) or type(error).__name__) from error


class Console:
    """The console of one proxy app: its keys, session signer and pages. `routes` go before the proxy's own."""

    def __init__(self, settings: ConsoleSettings, env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self._env = os.environ if env is None else env
        secret = settings.session_secret.get_secret_value().encode() if settings.session_secret else None
        self.signer = SessionSigner(secret or secrets.token_bytes(32), settings.session_ttl_s)
        self.pages = Pages()
        self.sign_ins = SignInLimit()
        self.trials = InFlight(settings.playground_in_flight)
        configured = [key for key in (settings.admin_key, *settings.tenant_keys) if key is not None]
        missing = [key[4:] for key in configured if key.startswith("env:") and not self._env.get(key[4:])]
        for name in missing:
            log.warning("console key variable %s is not set: that key cannot sign in to /console", name)
        if not self.keys().holders:
            log.warning("the console is on but has no key that can sign in: set %s", ", ".join(missing))

    def keys(self) -> ConsoleKeys:
        """The console keys, env keys read now (a rotated variable takes effect, and signs its holders out)."""
        return ConsoleKeys.read(self.settings, self._env)

    @property
    def routes(self) -> list[Route]:
        """The console's routes, every path under /console."""
        pages: list[tuple[str, Callable[[Request, _Visit], Awaitable[Response]]]] = [
            ("/decisions", self._decisions),
            ("/decisions/{decision_id}", self._decision),
            ("/tenants", self._tenants),
            ("/policies", self._policies),
        ]
        routes = [
            Route(PREFIX, self._index, methods=["GET"]),
            Route(f"{PREFIX}/login", self._login_form, methods=["GET"]),
            Route(f"{PREFIX}/login", self._login, methods=["POST"]),
            Route(f"{PREFIX}/logout", self._logout, methods=["POST"]),
            Route(f"{PREFIX}/static/console.css", self._stylesheet, methods=["GET"]),
            Route(f"{PREFIX}/playground", self._signed_in(self._playground_form), methods=["GET"]),
            Route(f"{PREFIX}/playground", self._signed_in(self._playground), methods=["POST"]),
        ]
        routes += [Route(PREFIX + path, self._signed_in(page), methods=["GET"]) for path, page in pages]
        methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        return [*routes, Route(PREFIX + "/{rest:path}", self._unknown, methods=methods)]

    # -- responses ------------------------------------------------------------------------------------------

    def _html(self, request: Request, template: str, session: Session, status: int = 200, **context: Any) -> Response:
        """A page; `session` is set as the cookie (it may be the one the request brought)."""
        context.setdefault("viewer", session.viewer)
        context.setdefault("current", request.url.path)
        body = self.pages.render(template, csrf=self.signer.csrf_token(session), **context)
        return self._secured(request, HTMLResponse(body, status_code=status), session)

    def _secured(self, request: Request, response: Response, session: Session | None) -> Response:
        response.headers.update(SECURITY_HEADERS)
        if session is not None:
            response.set_cookie(
                COOKIE,
                self.signer.cookie(session),
                max_age=max(1, int(session.expires - time.time())),
                path=PREFIX,
                secure=request.url.scheme == "https",
                httponly=True,
                samesite="strict",
            )
        return response

    def _redirect(self, request: Request, path: str, session: Session | None = None) -> Response:
        return self._secured(request, RedirectResponse(path, status_code=303), session)

    def _error(self, request: Request, session: Session, status: int, heading: str, message: str) -> Response:
        return self._html(request, "error.html", session, status, heading=heading, message=message)

    # -- sessions and forms ---------------------------------------------------------------------------------

    def _session(self, request: Request) -> Session | None:
        return self.signer.read(request.cookies.get(COOKIE), time.time())

    def _keyed(self, session: Session, viewer: Viewer) -> bool:
        """True while the key that signed `session` in is still configured for `viewer`."""
        return self.signer.still_keyed(session, self.keys().digests_of(viewer))

    def _signed_in(
        self, page: Callable[[Request, _Visit], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """`page` for a signed-in viewer whose key is still configured; others go to the sign-in form."""

        async def endpoint(request: Request) -> Response:
            session = self._session(request)
            viewer = session.viewer if session is not None else None
            if session is None or viewer is None or not self._keyed(session, viewer):
                if request.method == "POST":
                    fresh = self.signer.anonymous(time.time())
                    return self._error(request, fresh, 403, "Signed out", "Sign in again, then send the form again.")
                return self._redirect(request, f"{PREFIX}/login")
            runtime: Runtime = request.app.state.runtime
            visit = _Visit(session, viewer, runtime, runtime.tenancy)  # the one read of the tenancy
            try:
                return await page(request, visit)
            except _StoreUnreadable as error:  # what it said may name hosts: the log has it, the page does not
                log.warning("console: the decision store could not be read: %s", error)
                message = "The decision store could not be read; the proxy's log says why."
                return self._error(request, session, 503, "The decision store failed", message)

        return endpoint

    async def _form(self, request: Request, session: Session) -> dict[str, str] | Response:
        """The POSTed form's fields, or the refusal: not a form, cross-site, or without this session's token."""
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != _FORM:
            return self._error(request, session, 415, "Not a form", f"The console takes forms sent as {_FORM}.")
        if _cross_site(request):
            return self._error(request, session, 403, "Refused", "A form from another site cannot post here.")
        try:
            fields = dict(reversed(parse_qsl((await request.body()).decode("utf-8"), keep_blank_values=True)))
        except (UnicodeDecodeError, ValueError):
            return self._error(request, session, 400, "Unreadable form", "The form's body is not UTF-8.")
        if not self.signer.csrf_ok(session, fields.get("csrf")):
            return self._error(
                request, session, 403, "Refused", "This form is stale or did not come from the console: reload it."
            )
        return fields

    # -- sign-in --------------------------------------------------------------------------------------------

    async def _index(self, request: Request) -> Response:
        return self._redirect(request, f"{PREFIX}/decisions")

    async def _stylesheet(self, request: Request) -> Response:
        response = Response(self.pages.stylesheet, media_type="text/css")
        response = self._secured(request, response, None)
        response.headers["cache-control"] = "max-age=300"
        return response

    async def _login_form(self, request: Request) -> Response:
        session = self._session(request)
        if session is not None and session.viewer is not None and self._keyed(session, session.viewer):
            return self._redirect(request, f"{PREFIX}/decisions")
        # a session whose key was removed starts again, signed out
        fresh = session if session is not None and session.viewer is None else self.signer.anonymous(time.time())
        return self._html(request, "login.html", fresh, problem=None)

    async def _login(self, request: Request) -> Response:
        session = self._session(request)
        address = request.client.host if request.client is not None else ""  # uvicorn's: see limits.py
        wait_s = self.sign_ins.retry_after(address)
        if wait_s is not None:  # checked before the key: a refusal says nothing of whether it was right
            minutes = math.ceil(wait_s / 60)
            problem = f"Too many failed sign-ins from your address: try again in {minutes} minute{'s' * (minutes > 1)}."
            fresh = session or self.signer.anonymous(time.time())
            refused = self._html(request, "login.html", fresh, 429, problem=problem)
            refused.headers["retry-after"] = str(whole_seconds(wait_s))
            return refused
        if session is None:
            fresh = self.signer.anonymous(time.time())
            problem = "Your browser sent no console cookie (or an expired one): sign in again from this page."
            return self._html(request, "login.html", fresh, 403, problem=problem)
        fields = await self._form(request, session)
        if isinstance(fields, Response):
            return fields
        holder = self.keys().holder(fields.get("console_key", "").strip())
        if holder is None:
            self.sign_ins.failed(address)
            return self._html(request, "login.html", session, 401, problem="That is not a console key.")
        digest, viewer = holder
        return self._redirect(request, f"{PREFIX}/decisions", self.signer.signed_in(viewer, digest, time.time()))

    async def _logout(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return self._redirect(request, f"{PREFIX}/login", self.signer.anonymous(time.time()))
        fields = await self._form(request, session)
        if isinstance(fields, Response):
            return fields
        return self._redirect(request, f"{PREFIX}/login", self.signer.anonymous(time.time()))

    async def _unknown(self, request: Request) -> Response:
        session = self._session(request) or self.signer.anonymous(time.time())
        return self._error(request, session, 404, "Not found", "The console has no such page.")

    # -- pages ----------------------------------------------------------------------------------------------

    def _refused(self, request: Request, visit: _Visit, tenant: str) -> Response:
        message = f"This key sees tenant {visit.viewer.tenant} only, not {tenant}."
        return self._error(request, visit.session, 403, "Another tenant", message)

    async def _decisions(self, request: Request, visit: _Visit) -> Response:
        own = None if visit.viewer.is_admin else (visit.viewer.tenant or "",)
        filters = read_filters(dict(request.query_params), own)
        if filters.query.tenant and not visit.viewer.sees(filters.query.tenant):
            return self._refused(request, visit, filters.query.tenant)
        store = visit.store
        decisions: list[DecisionRecord] = []
        total = 0
        if store is not None and not filters.problems:
            decisions, total = await asyncio.gather(_ask(store.query, filters.query), _ask(store.count, filters.query))
        pages = max(1, math.ceil(total / PAGE_SIZE))
        return self._html(
            request,
            "decisions.html",
            visit.session,
            400 if filters.problems else 200,
            store=store is not None,
            filters=filters,
            decisions=decisions,
            total=total,
            first=filters.query.offset + 1,
            last=filters.query.offset + len(decisions),
            pages=pages,
            tenants=visit.tenants(),
            verdicts=VERDICTS,
            actions=ACTIONS,
            sides=SIDES,
        )

    async def _decision(self, request: Request, visit: _Visit) -> Response:
        decision_id = request.path_params["decision_id"]
        store = visit.store
        records = await _ask(store.get, decision_id) if store is not None and len(decision_id) <= _MAX_ID else []
        records = [record for record in records if visit.viewer.sees(record.tenant)]
        if store is None or not records:
            # another tenant's decision is not found either: a tenant key cannot learn which ids exist
            return self._error(request, visit.session, 404, "No such decision", "No decision you can see has that id.")
        texts: dict[tuple[str, str, str], PolicyVersion] = {}
        for tenant in {record.tenant for record in records}:
            for version, _ in await _ask(store.policy_versions, tenant):
                texts[(tenant, version.policy_id, version.version)] = version
        items, shown = [], set()
        for record in records:  # each policy text once: a request's screens were mostly judged by one version
            key = (record.tenant, record.policy_id, record.policy_version)
            items.append((record, texts.get(key), key in shown))
            shown.add(key)
        return self._html(
            request, "decision.html", visit.session, decision_id=decision_id, items=items, current="/console/decisions"
        )

    async def _tenants(self, request: Request, visit: _Visit) -> Response:
        tenancy = visit.tenancy
        policies = tenancy.policies
        errors = policies.errors()
        rows = []
        for tenant in visit.viewer.visible(policies.entries):
            policy, path = policies.get(tenant), policies.entries[tenant].path
            shown = str(path) if visit.viewer.is_admin else path.name  # where the files live is the admin's business
            error = errors.get(tenant)
            if error is not None and not visit.viewer.is_admin:
                error = error.replace(str(path), path.name)
            rows.append(
                {
                    "tenant": tenant,
                    "policy_id": policy.id,
                    "version": policy.version,
                    "path": shown,
                    "error": error,
                }
            )
        return self._html(
            request,
            "tenants.html",
            visit.session,
            rows=rows,
            config_error=tenancy.config_error if visit.viewer.is_admin else None,
            reload_errors=policies.reload_errors,
        )

    async def _policies(self, request: Request, visit: _Visit) -> Response:
        tenants = visit.tenants()
        chosen = request.query_params.get("tenant") or (tenants[0] if tenants else "")
        if not visit.viewer.sees(chosen):
            return self._refused(request, visit, chosen)
        store = visit.store
        versions = await _ask(store.policy_versions, chosen) if store is not None else []
        by_version = {version.version: (version, count) for version, count in versions}
        wanted_new = request.query_params.get("new") or (versions[0][0].version if versions else "")
        wanted_old = request.query_params.get("old") or (versions[1][0].version if len(versions) > 1 else "")
        problem = None
        unknown = [wanted for wanted in (wanted_old, wanted_new) if wanted and wanted not in by_version]
        if unknown and versions:
            problem = f"Tenant {chosen} has no policy version {unknown[0]} in the store."
        old, old_count = by_version.get(wanted_old, (None, 0))
        new, new_count = by_version.get(wanted_new, (None, 0))
        rows = side_by_side(old.source, new.source) if old is not None and new is not None else []
        entry = visit.tenancy.policies.entries.get(chosen)
        active = entry.policy.version if entry is not None else None
        return self._html(
            request,
            "policies.html",
            visit.session,
            400 if problem else 200,
            store=store is not None,
            tenants=tenants,
            chosen=chosen,
            versions=versions,
            old=old,
            new=new,
            old_count=old_count,
            new_count=new_count,
            rows=rows,
            changed=changed_lines(rows),
            active=active,
            problem=problem,
        )

    def _playground_page(
        self,
        request: Request,
        visit: _Visit,
        form: Mapping[str, str],
        status: int = 200,
        trial: Trial | None = None,
        problem: str | None = None,
    ) -> Response:
        return self._html(
            request,
            "playground.html",
            visit.session,
            status,
            tenants=visit.tenants(),
            form=form,
            trial=trial,
            problem=problem,
        )

    async def _playground_form(self, request: Request, visit: _Visit) -> Response:
        tenant = request.query_params.get("tenant", "")
        if tenant and not visit.viewer.sees(tenant):
            return self._refused(request, visit, tenant)
        return self._playground_page(request, visit, {"tenant": tenant, "side": "input", "text": "", "prompt": ""})

    async def _playground(self, request: Request, visit: _Visit) -> Response:
        fields = await self._form(request, visit.session)
        if isinstance(fields, Response):
            return fields
        form = {name: fields.get(name, "") for name in ("tenant", "side", "text", "prompt")}
        tenant, side = form["tenant"], form["side"]
        if not visit.viewer.sees(tenant):
            return self._refused(request, visit, tenant)
        policies = visit.tenancy.policies
        if tenant not in policies.entries:
            return self._playground_page(request, visit, form, 400, problem=f"There is no tenant {tenant!r}.")
        if side not in ("input", "output"):
            return self._playground_page(request, visit, form, 400, problem="Choose the input or the output side.")
        if not form["text"].strip():
            return self._playground_page(request, visit, form, 400, problem="Write the text to screen.")
        if not self.trials.take():
            problem = (
                f"The playground is busy: {self.trials.most} trials are being screened already "
                "(console.playground_in_flight). Try again in a moment."
            )
            busy = self._playground_page(request, visit, form, 429, problem=problem)
            busy.headers["retry-after"] = "1"
            return busy
        try:
            # the proxy's own engine and settings, never its verdict cache: a trial must not seed verdicts for
            # traffic, nor be answered by them
            screener = visit.runtime.pipeline.screener.uncached()
            trial = await try_text(screener, policies.get(tenant), tenant, Side(side), form["text"], form["prompt"])
        finally:
            self.trials.give_back()
        return self._playground_page(request, visit, form, trial=trial)
