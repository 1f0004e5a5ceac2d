// The store conformance suite, run against MemoryStore in every test run.

use latchkey_core::MemoryStore;

latchkey_core::store_conformance_tests!(async { MemoryStore::new() });
