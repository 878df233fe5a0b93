from sovctl.cli import main

main()
