from rbee_fleet.keeper.cli.entry import main

main()
