// The custom store passes the conformance suite sled, PostgreSQL and MemoryStore pass:
// one test per case, each on a fresh store.

latchkey_core::store_conformance_tests!(async { latchkey_examples::BTreeStore::default() });
