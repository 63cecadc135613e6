from privmed.cli import main

main()
