from epcli.cli import main

main()
