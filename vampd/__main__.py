from vampd.cli import entry

entry()
