from rbee_fleet.hive.main import main

main()
