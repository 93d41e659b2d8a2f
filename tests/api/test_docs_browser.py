"""The interactive API docs in a real Chromium under a strict Content-Security-Policy: Swagger UI's
files come from the console itself (no CDN), and it renders every operation without a CSP violation.

The policy is added to the docs page's response in the browser (Playwright's routing), standing in
for the console-wide policy another change brings."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

STRICT_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def test_it_renders_the_docs_from_local_files_under_a_strict_csp(browser_page, console_server):
    requested_hosts, violations = set(), []
    browser_page.on("request", lambda request: requested_hosts.add(request.url.split("/")[2]))
    browser_page.on(
        "console",
        lambda message: (
            violations.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )

    def with_csp(route):
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": STRICT_CSP})

    browser_page.route("**/api/v1/docs", with_csp)
    browser_page.goto(f"{console_server}/api/v1/docs")

    browser_page.wait_for_selector(".opblock-summary-path", timeout=20_000)
    paths = browser_page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/api/v1/migrations" in path for path in paths)
    assert requested_hosts == {console_server.split("/")[2]}
    assert violations == []


def test_the_navigation_links_the_api_docs_by_the_address_people_guess(browser_page, console_server):
    """Issue 21.7: /api/docs answered 404 and nothing on the pages led to the docs."""
    from tests.conftest import log_in, run_in_thread
    from tests.factories import PASSWORD, make_user

    run_in_thread(make_user, "reader", ("vms.view_vsp", "vms.view_virtualmachine"))
    log_in(browser_page, console_server, "reader", PASSWORD)
    browser_page.click("#nav-api-docs")
    browser_page.wait_for_selector(".opblock-summary-path", timeout=20_000)
    assert browser_page.url == f"{console_server}/api/v1/docs"
    browser_page.goto(f"{console_server}/api/docs")
    assert browser_page.url == f"{console_server}/api/v1/docs"
