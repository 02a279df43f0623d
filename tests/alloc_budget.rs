//! Heap allocations per request on the streaming road's fixed path (`FhirProxy::fixed_cost`:
//! request head in, upstream head out, the server's head and a one-chunk body in, the client's
//! out; no network), held to a budget. A change that adds allocations to every request fails
//! here instead of showing up in a hospital's CPU bill. Counted by a counting global allocator
//! over the same request repeated, on one thread: deterministic.
//!
//! When a change lowers the count, lower the budget with it (the test prints the count).

#[path = "common/fixed.rs"]
mod fixed;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Budgets, allocations per request: what was measured when they were set (insecure_dev 27,
/// jwt 44; Pingora's own parsing, pooling and writing are not counted) and a little room.
const BUDGET_INSECURE_DEV: u64 = 29;
const BUDGET_JWT: u64 = 46;

const REQUESTS: u64 = 2000;

/// Allocations per request, the cloning of the inputs not counted.
fn per_request(jwt: bool) -> u64 {
    let f = fixed::fixture(jwt);
    let ip: std::net::IpAddr = "10.0.0.4".parse().unwrap();
    let run = |response, body| {
        futures::executor::block_on(f.proxy.fixed_cost(&f.request, ip, response, body))
            .expect("the fixed path answers")
    };
    // Warm up: the token and public-base caches, lazily built statics, metric series.
    for _ in 0..100 {
        let x = run(f.response.clone(), f.body.clone());
        check(&x, jwt);
    }
    // What preparing the inputs costs, to subtract.
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..REQUESTS {
        drop(std::hint::black_box((f.response.clone(), f.body.clone())));
    }
    let inputs = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..REQUESTS {
        drop(std::hint::black_box(run(
            f.response.clone(),
            f.body.clone(),
        )));
    }
    let total = ALLOCATIONS.load(Ordering::Relaxed) - before;
    (total - inputs).div_ceil(REQUESTS)
}

/// The fixed path did its job: the upstream head is the gateway's, the body and head name
/// the gateway, not the server, and the body goes out with its length.
fn check(x: &fhir_gateway::proxy::fixed::Exchange, jwt: bool) {
    let up = &x.upstream_request;
    assert_eq!(up.raw_path(), b"/fhir/Patient/1");
    assert_eq!(up.headers["host"], "127.0.0.1:18090");
    assert!(up.headers.get("x-request-id").is_some());
    assert!(
        up.headers.get("authorization").is_none(),
        "no caller token upstream"
    );
    assert_eq!(
        up.headers.get("x-ms-azurefhir-audit-userid").is_some(),
        jwt,
        "audit headers name the caller"
    );
    let body = std::str::from_utf8(&x.body).unwrap();
    assert!(!body.contains(fixed::UPSTREAM), "{body}");
    assert_eq!(
        body.matches("http://fhir.hospital.example/fhir/").count(),
        6,
        "{body}"
    );
    let r = &x.response;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["content-length"],
        x.body.len().to_string().as_str()
    );
    assert!(r.headers.get("transfer-encoding").is_none());
    assert!(r.headers.get("server").is_none());
    assert_eq!(r.headers["etag"], "W/\"6b1649a0-4e9\"");
}

#[test]
fn a_small_get_stays_within_its_allocation_budget() {
    // One test, so no other test thread allocates while counting.
    let insecure = per_request(false);
    let jwt = per_request(true);
    println!("allocations per request: insecure_dev {insecure}, jwt {jwt}");
    assert!(
        insecure <= BUDGET_INSECURE_DEV,
        "insecure_dev: {insecure} allocations per request, budget {BUDGET_INSECURE_DEV}"
    );
    assert!(
        jwt <= BUDGET_JWT,
        "jwt: {jwt} allocations per request, budget {BUDGET_JWT}"
    );
}
