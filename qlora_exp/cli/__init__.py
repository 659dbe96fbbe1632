"""The console scripts (qlora-train, -compare, -generate, -chat, -merge, -bench) and their shared
logging and exit-code handling; the library they drive lives beside this package."""
