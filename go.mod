module github.com/rcptguard/rcptguard

go 1.26
