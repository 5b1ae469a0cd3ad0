// The generated napi-rs loader, typed by its generated declarations.
import type * as Binding from '../index'

// eslint-disable-next-line @typescript-eslint/no-require-imports
export const binding: typeof Binding = require('../index.js')

export type NativeDatabase = Binding.NativeDatabase
export type NativeMapStore = Binding.NativeMapStore
export type NativeRange = Binding.NativeRange
export type NativeLocked = Binding.NativeLocked
export type NativeStats = Binding.NativeStats
export type NativeWatcher = Binding.NativeWatcher
